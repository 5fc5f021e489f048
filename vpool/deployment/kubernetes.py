"""A kustomize tree that runs vpool on Kubernetes, rendered as Python dicts and dumped as YAML.

One tree, two uses: `vpool deploy kubernetes MODEL...` writes it whole (the shared objects and
one worker Deployment per model), and `deploy/kubernetes/` in the repository holds its shared
part (`base/`) and the overlays' workers, checked against `example_files()` by
tests/unit/test_deploy_kubernetes.py so the two cannot drift apart. The objects themselves come
from fleet_objects.py and workers.py; this module lays them out as files.

    namespace.yaml        the Namespace
    vpool.yaml            vpool's YAML config; kustomize makes the ConfigMap `vpool-config`
                          from it (its name carries a hash, so a change rolls the pods)
    redis.yaml            Redis with an append-only file on a PersistentVolumeClaim
    controller.yaml       the controller Deployment and Service
    gateway.yaml          the gateway Deployment, Service, HorizontalPodAutoscaler and
                          PodDisruptionBudget
    workers.yaml          a headless Service over every worker, for the ServiceMonitor
    network-policies.yaml who may reach workers, the controller and Redis
    service-monitor.yaml  Prometheus Operator scrapes of gateways, workers and the controller
    workers/NAME.yaml     one Deployment per model, sized by the planner
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vpool.catalog.catalog import Catalog
from vpool.deployment.errors import DeployError
from vpool.deployment.fleet_objects import (
    controller_objects,
    gateway_objects,
    network_policies,
    redis_objects,
    service_monitors,
    vpool_config,
)
from vpool.deployment.k8s_objects import CONFIG_MAP, IMAGE_ROLES, NAME_LABELS, meta
from vpool.deployment.workers import WorkerPlan, plan_workers, worker_deployment, workers_service

DEFAULT_NAMESPACE = "vpool"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # what a namespace must be


@dataclass(frozen=True)
class TreeOptions:
    namespace: str = DEFAULT_NAMESPACE
    images: Mapping[str, str] = field(default_factory=dict)  # role -> image reference
    external_redis: bool = False


HEADER = "# Written by `vpool deploy kubernetes` (vpool/deployment/kubernetes.py).\n"
BASE_HEADER = (
    "# Generated from vpool/deployment/kubernetes.py: change that, then write this again with\n"
    "#   python -c 'from vpool.deployment.kubernetes import write_base; write_base()'\n"
    "# (tests/unit/test_deploy_kubernetes.py checks that the two match).\n"
)


def _dump(objects: list[dict[str, Any]], header: str) -> str:
    return header + yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False, width=120)


def _kustomization(resources: list[str], options: TreeOptions) -> dict[str, Any]:
    data: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": options.namespace,
        "resources": resources,
        "configMapGenerator": [{"name": CONFIG_MAP, "files": ["config.yaml=vpool.yaml"]}],
    }
    images = [_image_entry(role, ref) for role, ref in sorted(options.images.items())]
    if images:
        data["images"] = images
    return data


def _image_entry(role: str, reference: str) -> dict[str, str]:
    """kustomize's `images:` entry replacing the role's default image with `reference`."""
    name = IMAGE_ROLES[role].rsplit(":", 1)[0]
    entry = {"name": name}
    rest, _, digest = reference.partition("@")
    repo, tag = rest, ""
    if ":" in rest.rsplit("/", 1)[-1]:
        repo, tag = rest.rsplit(":", 1)
    entry["newName"] = repo
    if tag:
        entry["newTag"] = tag
    if digest:
        entry["digest"] = digest
    return entry


def shared_files(
    options: TreeOptions, extra_resources: Sequence[str] = (), header: str = HEADER
) -> dict[str, str]:
    """Every file but the workers': relative path -> text."""
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": meta(options.namespace, NAME_LABELS)}
    external_redis = options.external_redis
    files = {
        "namespace.yaml": [namespace],
        "redis.yaml": [] if external_redis else redis_objects(),
        "controller.yaml": controller_objects(external_redis=external_redis),
        "gateway.yaml": gateway_objects(external_redis=external_redis),
        "workers.yaml": [workers_service()],
        "network-policies.yaml": network_policies(external_redis=external_redis),
        "service-monitor.yaml": service_monitors(),
    }
    resources = [path for path, objects in files.items() if objects] + list(extra_resources)
    texts = {path: _dump(objects, header) for path, objects in files.items() if objects}
    texts["vpool.yaml"] = header + yaml.safe_dump(vpool_config(), sort_keys=False)
    texts["kustomization.yaml"] = header + yaml.safe_dump(_kustomization(resources, options), sort_keys=False)
    return dict(sorted(texts.items()))


def worker_file(worker: WorkerPlan, header: str = HEADER) -> str:
    return _dump([worker_deployment(worker)], header)


def render_tree(workers: Sequence[WorkerPlan], options: TreeOptions) -> dict[str, str]:
    """The whole tree `vpool deploy kubernetes` writes: relative path -> text."""
    paths = [f"workers/{w.slug}.yaml" for w in workers]
    files = shared_files(options, paths)
    for worker, path in zip(workers, paths, strict=True):
        files[path] = worker_file(worker)
    return files


# The worker files of deploy/kubernetes/overlays: path -> (model, GPU type or None for a CPU).
EXAMPLE_WORKERS = {
    "overlays/cpu-laptop/tiny-chat.yaml": ("tiny-chat", None),
    "overlays/gpu/meta-llama-3-1-8b-instruct.yaml": ("Meta-Llama-3.1-8B-Instruct", "H100-80GB"),
}


def example_files(catalog: Catalog) -> dict[str, str]:
    """What `deploy/kubernetes/` holds that this module writes, by path under it: `base/`
    (the shared objects, no workers) and the overlays' worker Deployments."""
    files = {f"base/{path}": text for path, text in shared_files(TreeOptions(), header=BASE_HEADER).items()}
    for path, (model, gpu) in EXAMPLE_WORKERS.items():
        (worker,) = plan_workers([model], catalog, gpu=gpu)
        files[path] = worker_file(worker, header=BASE_HEADER)
    return files


def write_base(root: Path | str = "deploy/kubernetes") -> None:
    """Write `deploy/kubernetes/`'s generated files again after changing this module."""
    from vpool.catalog.catalog import load_catalog

    for path, text in example_files(load_catalog(environ={})).items():
        target = Path(root) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


def write_tree(files: Mapping[str, str], out: Path, *, force: bool = False) -> list[Path]:
    """Write `files` under `out`, which must be missing or empty unless `force` (then only the
    files named are replaced). DeployError when it cannot."""
    if out.exists() and not out.is_dir():
        raise DeployError(f"{out} exists and is not a directory", code="out_not_writable", param="out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise DeployError(
            f"{out} is not empty: choose another --out, or pass --force to overwrite its files",
            code="out_not_empty",
            param="out",
        )
    written: list[Path] = []
    try:
        for path, text in files.items():
            target = out / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(target)
    except OSError as exc:
        raise DeployError(
            f"cannot write {out}: {exc.strerror or exc}", code="out_not_writable", param="out"
        ) from None
    return written
