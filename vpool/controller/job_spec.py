"""From a launch request to what a job runs: the catalog entry with its overrides applied.

The controller resolves every launch here, against its own catalog (the built-in one,
`controller.launch.catalog` files and `VPOOL_CATALOG`), so the CLI only names a model. When
a GPU type is given the planner checks the job fits before anything is queued, and picks
the tensor- and pipeline-parallel sizes the launch did not set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vpool.catalog.catalog import Catalog, CatalogEntry
from vpool.catalog.errors import CatalogError
from vpool.catalog.errors import UnknownModel as CatalogUnknownModel
from vpool.catalog.planner import plan
from vpool.config import LaunchSettings, ModelSpec
from vpool.controller.slurm import SlurmResources
from vpool.errors import InvalidRequest, NotFound
from vpool.launch import LaunchRequest


class UnknownModel(NotFound):
    default_code = "model_not_in_catalog"


class DoesNotFit(InvalidRequest):
    status_code = 422
    default_code = "does_not_fit"


@dataclass
class JobSpec:
    """What one job runs: the worker's model spec, its replicas, its Slurm resources."""

    entry: CatalogEntry
    model: ModelSpec  # what each worker loads and serves
    replicas: int
    resources: SlurmResources
    config: dict[str, Any]  # the launch config, as `vpool launch` prints it


def resolve(request: LaunchRequest, catalog: Callable[[], Catalog], settings: LaunchSettings) -> JobSpec:
    """The job a launch asks for; 404 for a model the catalog lacks, 422 when it cannot fit,
    400 for a catalog or a plan that cannot be used (a bad file, an unknown GPU)."""
    try:
        return _resolve(request, catalog(), settings)
    except CatalogUnknownModel as exc:
        raise UnknownModel(exc.message, param="model") from None
    except CatalogError as exc:
        raise InvalidRequest(exc.message, param=exc.param, code=exc.code) from None


def _resolve(request: LaunchRequest, catalog: Catalog, settings: LaunchSettings) -> JobSpec:
    entry = catalog.get(request.model)
    o = request.overrides
    slurm = entry.slurm
    engine_args = {**entry.vllm_engine_args(), **_vllm_args(o.vllm_args), **o.engine_args}
    tp = o.tensor_parallel_size or engine_args.pop("tensor_parallel_size", None)
    pp = o.pipeline_parallel_size or engine_args.pop("pipeline_parallel_size", None)
    max_len = o.max_model_len or engine_args.pop("max_model_len", None) or entry.max_model_len
    backend = engine_args.pop("distributed_executor_backend", None)
    planned: dict[str, Any] | None = None
    if o.gpu:
        verdict = plan(
            entry, gpu=o.gpu, max_model_len=max_len, tensor_parallel_size=tp, pipeline_parallel_size=pp
        )
        planned = verdict.model_dump()
        if not verdict.fits and not request.force:
            raise DoesNotFit(
                f"{entry.name} does not fit on {o.gpu}: {verdict.total_gib:.1f} GiB per GPU needed at "
                f"TP {verdict.tensor_parallel_size} x PP {verdict.pipeline_parallel_size}, "
                f"{verdict.gpu_memory_gib:.1f} GiB there; the longest max_model_len that fits is "
                f"{verdict.max_model_len_that_fits}. Pass --force to launch anyway.",
                param="model",
            )
        tp = tp or verdict.tensor_parallel_size
        pp = pp or verdict.pipeline_parallel_size
    tp, pp = tp or 1, pp or 1
    weights_parent = Path(o.weights_dir) if o.weights_dir else settings.weights_dir
    model = ModelSpec(
        name=entry.name,
        model=entry.weights_path(weights_parent),
        runner=entry.runner,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        dtype=o.dtype or "auto",
        max_model_len=max_len,
        replicas=o.replicas or 1,
        engine_args=engine_args,
        distributed_executor_backend=backend,
    )
    num_nodes = o.num_nodes or slurm.num_nodes
    gpus = slurm.gpus_per_node if o.gpus_per_node is None else o.gpus_per_node
    if num_nodes > 1:  # one engine over several nodes: only vLLM's Ray executor spans them
        model.distributed_executor_backend = "ray"
    resources = SlurmResources(
        partition=o.partition or slurm.partition,
        qos=o.qos or slurm.qos,
        time=o.time or slurm.time,
        num_nodes=num_nodes,
        gpus_per_node=gpus,
        cpus_per_task=o.cpus_per_task or slurm.cpus_per_task,
        mem=o.mem or slurm.mem_per_node,
        account=o.account,
    )
    config: dict[str, Any] = {
        "model": entry.name,
        "family": entry.family,
        "type": entry.type,
        "launcher": request.launcher,
        "replicas": model.replicas,
        "weights": model.model,
        "max_model_len": max_len,
        "tensor_parallel_size": tp,
        "pipeline_parallel_size": pp,
        "dtype": model.dtype,
        "engine_args": model.engine_args,
    }
    if model.distributed_executor_backend:
        config["distributed_executor_backend"] = model.distributed_executor_backend
    if request.launcher == "slurm":
        config.update({k: v for k, v in vars(resources).items()})
    if planned is not None:
        config["plan"] = planned
    return JobSpec(entry=entry, model=model, replicas=model.replicas, resources=resources, config=config)


def _vllm_args(text: str | None) -> dict[str, Any]:
    """`--a=1,--b=2,--flag` (vec-inf's --vllm-args) as engine args."""
    parsed: dict[str, Any] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        if not item.startswith("--"):
            raise InvalidRequest(f"--vllm-args takes `--name=value` items, got `{item}`", param="vllm_args")
        key, sep, value = item[2:].partition("=")
        parsed[key.replace("-", "_")] = yaml.safe_load(value) if sep else True
    return parsed
