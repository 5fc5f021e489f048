"""One worker Deployment per model: the catalog entry, sized by the planner onto one node, and
the `vpool worker` flags, resources and probes that follow from it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from vpool.catalog.catalog import Catalog, CatalogEntry
from vpool.catalog.gpus import load_gpus
from vpool.catalog.planner import DEFAULT_GPU, Plan, plan
from vpool.deployment.errors import DeployError
from vpool.deployment.k8s_objects import (
    CACHE_DIR,
    CONTROLLER_PORT,
    MODEL_LABEL,
    WORKER_CPU_IMAGE,
    WORKER_GPU_IMAGE,
    WORKER_PORT,
    container_security,
    deployment,
    field_env,
    labels_for,
    pod_security,
    secret_env,
    selector_for,
    service,
)

# The worker's drain on SIGTERM (vpool/worker/server.py): tell the controller, wait this long
# for gateways to see it, stop accepting, finish in-flight requests for up to the timeout.
DRAIN_DELAY_S = 2.0
DRAIN_TIMEOUT_S = 300.0
ENGINE_STOP_MARGIN_S = 30  # deregistering and shutting the engine down after the drain
# Loading a large model (download included) may take many minutes: the startup probe waits
# this long before the liveness probe takes over.
WORKER_STARTUP_S = 1800


@dataclass(frozen=True)
class WorkerPlan:
    """One model's worker Deployment: its catalog entry and, on a GPU, the planner's layout."""

    entry: CatalogEntry
    slug: str  # the model's name as Kubernetes names allow
    max_model_len: int
    replicas: int = 1
    plan: Plan | None = None  # None: a CPU worker
    gpu_resource: str = "nvidia.com/gpu"

    @property
    def gpus(self) -> int:
        return self.plan.num_gpus if self.plan else 0

    @property
    def image(self) -> str:
        return WORKER_GPU_IMAGE if self.plan else WORKER_CPU_IMAGE

    @property
    def deployment_name(self) -> str:
        return f"vpool-worker-{self.slug}"


def k8s_name(name: str) -> str:
    """`Meta-Llama-3.1-8B-Instruct` -> `meta-llama-3-1-8b-instruct`: a DNS label, short enough
    for a label value and a Deployment's pod names."""
    slug = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", name.lower())).strip("-")
    return slug[:40].rstrip("-") or "model"


def plan_workers(
    models: Sequence[str],
    catalog: Catalog,
    *,
    gpu: str | None = None,
    replicas: int = 1,
    max_model_len: int | None = None,
    gpus_per_node: int = 8,
) -> list[WorkerPlan]:
    """A worker per model. With `gpu`, every model is planned on one node of that GPU type;
    without, models the catalog runs on a CPU (no GPU in its Slurm defaults) get CPU workers
    and the others are planned on the planner's default GPU. Raises UnknownModel, UnknownGPU
    (CatalogError) or DeployError (a model that cannot fit on one node, two models that would
    share a name)."""
    gpus = load_gpus()
    device = gpus.get(gpu) if gpu else None
    workers: list[WorkerPlan] = []
    seen: dict[str, str] = {}
    for name in models:
        entry = catalog.get(name)
        slug = k8s_name(entry.name)
        if slug in seen:
            same = seen[slug] == entry.name
            raise DeployError(
                f"{entry.name} is named twice"
                if same
                else f"{entry.name} and {seen[slug]} would both be "
                f"named vpool-worker-{slug}: deploy them in separate trees",
                param="model",
            )
        seen[slug] = entry.name
        engine_args = entry.vllm_engine_args()
        length = max_model_len or engine_args.get("max_model_len") or entry.max_model_len
        on_cpu = device is None and entry.slurm.gpus_per_node == 0
        if on_cpu:
            workers.append(WorkerPlan(entry, slug, length, replicas))
            continue
        target = device or gpus.get(DEFAULT_GPU)
        verdict = plan(
            entry,
            gpu=target,
            max_model_len=length,
            tensor_parallel_size=engine_args.get("tensor_parallel_size"),
            pipeline_parallel_size=engine_args.get("pipeline_parallel_size"),
            gpus_per_node=gpus_per_node,
            max_nodes=1,  # a worker is one pod, and a pod is on one node
        )
        if not verdict.fits:
            raise DeployError(
                f"{verdict.summary()} A worker pod runs on one node of up to {gpus_per_node} GPUs "
                "(--gpus-per-node): pick a larger GPU type, or a shorter --max-model-len.",
                code="does_not_fit",
                param="model",
            )
        resource = "amd.com/gpu" if target.vendor == "amd" else "nvidia.com/gpu"
        workers.append(WorkerPlan(entry, slug, length, replicas, verdict, resource))
    return workers


def _http_probe(path: str, period_s: int, failures: int, timeout_s: int = 3) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": timeout_s,
        "failureThreshold": failures,
    }


def _engine_arg(key: str, value: Any) -> str:
    """KEY=VALUE as `vpool worker --engine-arg` reads it back (a YAML scalar)."""
    bare = isinstance(value, str) and yaml.safe_load(value) == value
    return f"{key}={value if bare else json.dumps(value)}"  # JSON is a YAML scalar too


def worker_args(worker: WorkerPlan) -> list[str]:
    """`vpool worker` flags for one model: the catalog's weights, name, length and engine args,
    the planner's TP x PP, and the pod's own IP as the URL gateways reach it at."""
    entry = worker.entry
    engine_args = entry.vllm_engine_args()
    for key in ("max_model_len", "tensor_parallel_size", "pipeline_parallel_size"):
        engine_args.pop(key, None)
    utilization = engine_args.pop("gpu_memory_utilization", None)
    tp = worker.plan.tensor_parallel_size if worker.plan else 1
    pp = worker.plan.pipeline_parallel_size if worker.plan else 1
    args = [
        "worker",
        "--model", entry.weights_path(),
        "--served-name", entry.name,
        "--runner", entry.runner,
        "--max-model-len", str(worker.max_model_len),
        "--tensor-parallel-size", str(tp),
        "--pipeline-parallel-size", str(pp),
    ]  # fmt: skip
    if utilization is not None:
        args += ["--gpu-memory-utilization", str(utilization)]
    for key, value in engine_args.items():
        args += ["--engine-arg", _engine_arg(key, value)]
    args += [
        "--controller", f"http://vpool-controller:{CONTROLLER_PORT}",
        "--host", "0.0.0.0",
        "--port", str(WORKER_PORT),
        "--advertise-url", f"http://$(POD_IP):{WORKER_PORT}",  # the kubelet expands $(POD_IP)
        "--cache-dir", f"{CACHE_DIR}/vpool",
        "--drain-delay", f"{DRAIN_DELAY_S:g}",
        "--drain-timeout", f"{DRAIN_TIMEOUT_S:g}",
    ]  # fmt: skip
    return args


def _k8s_memory(slurm_mem: str) -> str:
    """Slurm's `64G` (binary units; a bare number is MB) as a Kubernetes quantity."""
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", slurm_mem).groups()  # type: ignore[union-attr]
    return f"{number}{(unit or 'M')}i"


def worker_deployment(worker: WorkerPlan) -> dict[str, Any]:
    entry, slurm = worker.entry, worker.entry.slurm
    memory = _k8s_memory(slurm.mem_per_node)
    requests: dict[str, Any] = {"cpu": str(slurm.cpus_per_task), "memory": memory}
    limits: dict[str, Any] = {"memory": memory}
    if worker.gpus:
        requests[worker.gpu_resource] = worker.gpus
        limits[worker.gpu_resource] = worker.gpus
    env = [
        field_env("POD_IP", "status.podIP"),
        field_env("VPOOL_WORKER_ID", "metadata.name"),  # a stable id per pod in the registry
        secret_env("VPOOL_REGISTRATION_TOKEN", "registration-token", optional=True),
        secret_env("HF_TOKEN", "hf-token", optional=True),  # gated hub models
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
    ]
    container = {
        "name": "worker",
        "image": worker.image,
        "command": ["vpool"],
        "args": worker_args(worker),
        "ports": [{"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"}],
        "env": env,
        # vLLM serves /health (and /metrics) on the worker's port once the engine is up.
        "startupProbe": _http_probe("/health", 10, WORKER_STARTUP_S // 10),
        "readinessProbe": _http_probe("/health", 5, 3),
        "livenessProbe": _http_probe("/health", 10, 6, timeout_s=5),
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "model-cache", "mountPath": CACHE_DIR},
        ],
        "securityContext": container_security(),
    }
    # No preStop: SIGTERM itself drains the worker (leave routing, finish in flight,
    # deregister); the grace period covers that whole drain before the kubelet kills.
    pod: dict[str, Any] = {
        "terminationGracePeriodSeconds": math.ceil(DRAIN_DELAY_S + DRAIN_TIMEOUT_S) + ENGINE_STOP_MARGIN_S,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [
            # vLLM's workers share tensors through /dev/shm; a container's default is 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "10Gi" if worker.gpus else "1Gi"}},
            # Hub downloads and generated models; an overlay may put a PersistentVolumeClaim here.
            {"name": "model-cache", "emptyDir": {}},
        ],
    }
    annotations = {"vpool.io/model-name": entry.name}
    if worker.plan:
        pod["tolerations"] = [{"key": worker.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
        annotations["vpool.io/gpu"] = worker.plan.gpu
        annotations["vpool.io/plan"] = worker.plan.summary()
    labels = labels_for("worker", **{MODEL_LABEL: worker.slug})
    return deployment(
        worker.deployment_name,
        "worker",
        worker.replicas,
        pod,
        selector=selector_for("worker", **{MODEL_LABEL: worker.slug}),
        labels=labels,
        annotations=annotations,
    )


def workers_service() -> dict[str, Any]:
    """A headless Service over every worker, so one ServiceMonitor scrapes them all."""
    return service("vpool-workers", "worker", WORKER_PORT, headless=True)
