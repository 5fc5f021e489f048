"""What every object of the Kubernetes tree agrees on: images, ports, names, labels, and the
Deployment and Service shapes, so the fleet's objects and the workers' cannot disagree.

Labels: `app.kubernetes.io/name: vpool`, `app.kubernetes.io/component: gateway | controller |
worker | redis`, and `vpool.io/model` on workers. A pod that runs the `vpool` CLI against the
controller (keys, launches) carries `vpool.io/role: cli`: the NetworkPolicy lets it in.
Secrets are never written: the pods read `vpool-secrets` (api-keys, registration-token,
admin-token, hf-token), which the user creates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GATEWAY_IMAGE = "vpool/gateway:0.1.0"  # the slim image runs the controller too
WORKER_GPU_IMAGE = "vpool/worker-gpu:0.1.0"
WORKER_CPU_IMAGE = "vpool/worker-cpu:0.1.0"
IMAGE_ROLES = {"gateway": GATEWAY_IMAGE, "worker-gpu": WORKER_GPU_IMAGE, "worker-cpu": WORKER_CPU_IMAGE}

GATEWAY_PORT = 8000
CONTROLLER_PORT = 8001
WORKER_PORT = 8000
REDIS_PORT = 6379
SECRETS = "vpool-secrets"
CONFIG_MAP = "vpool-config"
CACHE_DIR = "/cache"
UID = 10001  # the vpool user of deploy/docker's images

COMPONENT = "app.kubernetes.io/component"
MODEL_LABEL = "vpool.io/model"
METRICS_LABEL = "vpool.io/metrics"
NAME_LABELS = {"app.kubernetes.io/name": "vpool", "app.kubernetes.io/part-of": "vpool"}


def labels_for(component: str, **extra: str) -> dict[str, str]:
    return {**NAME_LABELS, COMPONENT: component, **extra}


def selector_for(component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vpool", COMPONENT: component, **extra}


def meta(name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": dict(labels)}


def secret_env(name: str, key: str, *, optional: bool, secret: str = SECRETS) -> dict[str, Any]:
    ref = {"name": secret, "key": key, "optional": optional}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _rolling() -> dict[str, Any]:
    # A new pod is Ready before an old one goes: no capacity is lost during an upgrade.
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}


def deployment(
    name: str, component: str, replicas: int, pod: dict[str, Any], *, selector: dict[str, str] | None = None,
    labels: dict[str, str] | None = None, strategy: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    select = selector or selector_for(component)
    pod_labels = labels or labels_for(component)
    template_meta: dict[str, Any] = {"labels": pod_labels}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(name, pod_labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": select},
            "strategy": strategy or _rolling(),
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


def service(
    name: str, component: str, port: int, *, headless: bool = False, metrics: bool = True
) -> dict[str, Any]:
    labels = labels_for(component, **({METRICS_LABEL: "true"} if metrics else {}))
    spec: dict[str, Any] = {
        "selector": selector_for(component),
        "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
    }
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, labels), "spec": spec}
