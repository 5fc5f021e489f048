"""`vpool deploy kubernetes MODEL...`: write a kustomize tree for a fleet, sized by the planner.

Reads the catalog here, with no controller, as `vpool list` and `vpool plan` do. Errors are
one sentence on stderr and exit status 2 (`{"error": {...}}` on stdout under `--json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vpool.catalog.catalog import load_catalog
from vpool.catalog.errors import CatalogError
from vpool.cli.catalog import CatalogOpt
from vpool.cli.common import JsonOpt, app, fail, print_json
from vpool.deployment.errors import DeployError
from vpool.deployment.k8s_objects import IMAGE_ROLES
from vpool.deployment.kubernetes import DEFAULT_NAMESPACE, DNS_LABEL, TreeOptions, render_tree, write_tree
from vpool.deployment.workers import WorkerPlan, plan_workers

DEPLOY_HELP = "Write the files that run vpool on other systems (Kubernetes)."
deploy_app = typer.Typer(help=DEPLOY_HELP, no_args_is_help=True)
app.add_typer(deploy_app, name="deploy", help=DEPLOY_HELP)


@deploy_app.command("kubernetes")
def kubernetes(
    models: Annotated[
        list[str], typer.Argument(help="Catalog names (`vpool list`), one worker Deployment each.")
    ],
    gpu: Annotated[
        str | None,
        typer.Option(
            help="GPU type every model is planned on (H100-80GB, a100, L4, ...). Default: models the "
            "catalog runs on a CPU get CPU workers, the others are planned on the planner's default GPU."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory to write; must be missing or empty.")] = Path(
        "vpool-kubernetes"
    ),
    namespace: Annotated[str, typer.Option(help="Namespace of every object.")] = DEFAULT_NAMESPACE,
    image: Annotated[
        list[str] | None,
        typer.Option(
            help="ROLE=IMAGE, written as kustomize `images:`: gateway (also runs the controller), "
            "worker-gpu, worker-cpu. Repeatable. e.g. --image gateway=reg.example.com/vpool/gateway:0.1.1"
        ),
    ] = None,
    replicas: Annotated[int, typer.Option(min=1, help="Workers per model.")] = 1,
    max_model_len: Annotated[
        int | None, typer.Option(min=1, help="Context every model serves (default: the catalog's).")
    ] = None,
    gpus_per_node: Annotated[
        int, typer.Option(min=1, help="GPUs on one node: the largest layout a worker pod may ask for.")
    ] = 8,
    external_redis: Annotated[
        bool,
        typer.Option(help="No Redis in the tree: the registry URL comes from Secret vpool-redis, key url."),
    ] = False,
    force: Annotated[bool, typer.Option(help="Write into a directory that is not empty.")] = False,
    catalog: CatalogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a kustomize tree that runs vpool on Kubernetes, from the catalog and the planner.

    The tree: Redis, the controller, gateways (autoscaled on CPU), one worker per MODEL.

    Also: network policies, a disruption budget, Prometheus Operator ServiceMonitors.

    Each GPU worker asks for the GPUs of the planner's layout (TP x PP) on one node.

    A model that does not fit on one node of the GPU type is refused.

    Create Secret vpool-secrets (api-keys; registration-token, admin-token, hf-token optional).

    Then: kubectl apply -k DIR"""
    try:
        images = _images(image or [])
        if not DNS_LABEL.match(namespace) or len(namespace) > 63:
            raise DeployError(
                f'namespace "{namespace}" is not a DNS label (lowercase letters, digits and -, at most 63)',
                param="namespace",
            )
        workers = plan_workers(
            models,
            load_catalog(catalog or []),
            gpu=gpu,
            replicas=replicas,
            max_model_len=max_model_len,
            gpus_per_node=gpus_per_node,
        )
        options = TreeOptions(namespace=namespace, images=images, external_redis=external_redis)
        written = write_tree(render_tree(workers, options), out, force=force)
    except (CatalogError, DeployError) as exc:
        fail(exc, as_json)
    if as_json:
        print_json(
            {
                "out": str(out),
                "namespace": namespace,
                "files": [str(p.relative_to(out)) for p in written],
                "workers": [_worker_summary(w) for w in workers],
            }
        )
        return
    for worker in workers:
        typer.echo(_worker_line(worker))
    typer.echo(f"Wrote {len(written)} files to {out}. Then:")
    typer.echo(
        f"  kubectl create namespace {namespace}\n"
        f"  kubectl -n {namespace} create secret generic vpool-secrets --from-literal=api-keys=sk-... \\\n"
        "      --from-literal=registration-token=$(openssl rand -hex 16)\n"
        f"  kubectl apply -k {out}"
    )


def _images(pairs: list[str]) -> dict[str, str]:
    images: dict[str, str] = {}
    for pair in pairs:
        role, sep, reference = pair.partition("=")
        if not sep or role not in IMAGE_ROLES or not reference.strip():
            raise DeployError(
                f"--image expects ROLE=IMAGE with ROLE one of {', '.join(IMAGE_ROLES)}, got `{pair}`",
                param="image",
            )
        images[role] = reference.strip()
    return images


def _worker_summary(worker: WorkerPlan) -> dict[str, object]:
    p = worker.plan
    return {
        "model": worker.entry.name,
        "deployment": worker.deployment_name,
        "replicas": worker.replicas,
        "max_model_len": worker.max_model_len,
        "gpu": p.gpu if p else None,
        "gpus": worker.gpus,
        "gpu_resource": worker.gpu_resource if p else None,
        "tensor_parallel_size": p.tensor_parallel_size if p else 1,
        "pipeline_parallel_size": p.pipeline_parallel_size if p else 1,
        "image": worker.image,
        "plan": p.summary() if p else None,
    }


def _worker_line(worker: WorkerPlan) -> str:
    p = worker.plan
    where = (
        f"{worker.gpus} x {p.gpu}, TP {p.tensor_parallel_size} x PP {p.pipeline_parallel_size}"
        if p
        else "CPU"
    )
    return f"{worker.deployment_name}: {worker.entry.name}, {worker.replicas} replica(s) on {where}"
