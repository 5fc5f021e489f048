"""The objects every fleet has whatever its models: Redis, the controller, the gateways (with
their autoscaler and disruption budget), the NetworkPolicies, the Prometheus Operator
ServiceMonitors, and the config file the pods read."""

from __future__ import annotations

import math
from typing import Any

from vpool.deployment.k8s_objects import (
    CACHE_DIR,
    COMPONENT,
    CONFIG_MAP,
    CONTROLLER_PORT,
    GATEWAY_IMAGE,
    GATEWAY_PORT,
    METRICS_LABEL,
    MODEL_LABEL,
    NAME_LABELS,
    REDIS_PORT,
    SECRETS,
    WORKER_PORT,
    container_security,
    deployment,
    field_env,
    labels_for,
    meta,
    pod_security,
    secret_env,
    selector_for,
    service,
)

REDIS_SECRET = "vpool-redis"  # key `url`, with --external-redis
CONFIG_DIR = "/etc/vpool"
# The gateway's preStop: time for endpoint controllers and kube-proxy to stop sending new
# connections before the gateway closes its socket; then its graceful_shutdown_s.
GATEWAY_PRESTOP_S = 5
GATEWAY_GRACEFUL_SHUTDOWN_S = 30.0
GATEWAY_MARGIN_S = 10
HEALTHCHECK = "/usr/local/bin/vpool-healthcheck"  # in deploy/docker's gateway image
CLI_ROLE = {"vpool.io/role": "cli"}
PROMETHEUS_POD = {"app.kubernetes.io/name": "prometheus"}  # as the Prometheus Operator labels them


def vpool_config() -> dict[str, Any]:
    """vpool's config file as the pods read it (vpool/config.py); secrets come as VPOOL_...
    variables from `vpool-secrets`, and any other field can be set by a `VPOOL_...` variable
    in the optional ConfigMap `vpool-env`."""
    return {
        # No host here: each pod binds 0.0.0.0 by its flag, because a gateway section on 0.0.0.0
        # with no key in the file would make the controller (which has no keys) refuse it.
        "gateway": {"port": GATEWAY_PORT, "graceful_shutdown_s": GATEWAY_GRACEFUL_SHUTDOWN_S},
        "controller": {"port": CONTROLLER_PORT},
        "registry": {"url": f"redis://vpool-redis:{REDIS_PORT}/0"},
        "cache_dir": f"{CACHE_DIR}/vpool",
    }


def _token_probe(port: int) -> dict[str, Any]:
    """The controller's /health needs the registration token once one is set, and an httpGet
    probe cannot read a Secret: deploy/docker's healthcheck script sends it from the env."""
    url = f"http://127.0.0.1:{port}/health"
    command = ["python", HEALTHCHECK, url, "--token-env", "VPOOL_REGISTRATION_TOKEN"]
    return {"exec": {"command": command}, "timeoutSeconds": 5}


def _config_volume() -> dict[str, Any]:
    return {"name": "config", "configMap": {"name": CONFIG_MAP}}


def _config_mount() -> dict[str, Any]:
    return {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}


def _registry_env(external_redis: bool) -> list[dict[str, Any]]:
    if not external_redis:
        return []
    return [secret_env("VPOOL_REGISTRY__URL", "url", optional=False, secret=REDIS_SECRET)]


def _env_from() -> list[dict[str, Any]]:
    return [{"configMapRef": {"name": "vpool-env", "optional": True}}]


def _service_container(
    name: str,
    args: list[str],
    port: int,
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    probe: dict[str, Any],
) -> dict[str, Any]:
    return {
        "name": name,
        "image": GATEWAY_IMAGE,
        "command": ["vpool"],
        "args": args,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        "envFrom": _env_from(),
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "resources": resources,
        "volumeMounts": [_config_mount()],
        "securityContext": container_security(),
    }


def controller_objects(*, external_redis: bool) -> list[dict[str, Any]]:
    env = [
        secret_env("VPOOL_REGISTRATION_TOKEN", "registration-token", optional=True),
        secret_env("VPOOL_ADMIN_TOKEN", "admin-token", optional=True),
        *_registry_env(external_redis),
    ]
    container = _service_container(
        "controller",
        ["controller", "--config", f"{CONFIG_DIR}/config.yaml", "--host", "0.0.0.0", "--no-launch"],
        CONTROLLER_PORT,
        env,
        {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        _token_probe(CONTROLLER_PORT),
    )
    pod = {
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [_config_volume()],
    }
    return [
        # One controller; the rollout starts the new one before stopping the old, so workers'
        # heartbeats never go unanswered for longer than their TTL.
        deployment("vpool-controller", "controller", 1, pod),
        service("vpool-controller", "controller", CONTROLLER_PORT),
    ]


def gateway_objects(*, external_redis: bool) -> list[dict[str, Any]]:
    env = [
        secret_env("VPOOL_API_KEYS", "api-keys", optional=False),
        field_env("POD_IP", "status.podIP"),
        # Announced in the registry, so the controller's /v1/targets lists every gateway pod.
        {"name": "VPOOL_GATEWAY__ADVERTISE_URL", "value": f"http://$(POD_IP):{GATEWAY_PORT}"},
        *_registry_env(external_redis),
    ]
    container = _service_container(
        "gateway",
        ["gateway", "--config", f"{CONFIG_DIR}/config.yaml", "--host", "0.0.0.0"],
        GATEWAY_PORT,
        env,
        # The autoscaler scales on CPU against this request.
        {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
        {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": 3},
    )
    container["lifecycle"] = {"preStop": {"exec": {"command": ["sleep", str(GATEWAY_PRESTOP_S)]}}}
    pod = {
        "terminationGracePeriodSeconds": GATEWAY_PRESTOP_S
        + math.ceil(GATEWAY_GRACEFUL_SHUTDOWN_S)
        + GATEWAY_MARGIN_S,
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": [_config_volume()],
    }
    select = {"matchLabels": selector_for("gateway")}
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta("vpool-gateway", labels_for("gateway")),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vpool-gateway"},
            "minReplicas": 2,
            "maxReplicas": 10,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta("vpool-gateway", labels_for("gateway")),
        "spec": {"maxUnavailable": 1, "selector": select},
    }
    return [
        deployment("vpool-gateway", "gateway", 2, pod),
        service("vpool-gateway", "gateway", GATEWAY_PORT),
        hpa,
        pdb,
    ]


def redis_objects() -> list[dict[str, Any]]:
    ping = {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 10, "timeoutSeconds": 3}
    container = {
        "name": "redis",
        "image": "redis:7.4-alpine",
        "args": ["redis-server", "--appendonly", "yes", "--dir", "/data"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "readinessProbe": ping,
        "livenessProbe": {**ping, "failureThreshold": 6},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        "securityContext": container_security(),
    }
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "runAsGroup": 999, "fsGroup": 999},
        "containers": [container],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "vpool-redis-data"}}],
    }
    labels = labels_for("redis")
    return [
        # Recreate: the volume is ReadWriteOnce, and two Redis on one append-only file is worse.
        deployment("vpool-redis", "redis", 1, pod, strategy={"type": "Recreate"}),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("vpool-redis", labels),
            "spec": {
                "selector": selector_for("redis"),
                "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": meta("vpool-redis-data", labels),
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    ]


def _peer(component: str) -> dict[str, Any]:
    return {"podSelector": {"matchLabels": selector_for(component)}}


def _prometheus() -> dict[str, Any]:
    return {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(PROMETHEUS_POD)}}


def _policy(name: str, component: str, port: int | str, peers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(name, labels_for(component)),
        "spec": {
            "podSelector": {"matchLabels": selector_for(component)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": [{"protocol": "TCP", "port": port}]}],
        },
    }


def network_policies(*, external_redis: bool) -> list[dict[str, Any]]:
    """Workers: gateways (requests), the controller (its /health probe at registration, `vpool
    metrics`) and Prometheus. Controller: workers, CLI pods and Prometheus. Redis: gateways
    and the controller. Gateways stay open: they are the public API."""
    policies = [
        _policy(
            "vpool-worker", "worker", WORKER_PORT, [_peer("gateway"), _peer("controller"), _prometheus()]
        ),
        _policy(
            "vpool-controller",
            "controller",
            CONTROLLER_PORT,
            [_peer("worker"), {"podSelector": {"matchLabels": dict(CLI_ROLE)}}, _prometheus()],
        ),
    ]
    if not external_redis:
        policies.append(_policy("vpool-redis", "redis", REDIS_PORT, [_peer("gateway"), _peer("controller")]))
    return policies


def service_monitors() -> list[dict[str, Any]]:
    """Gateways and workers serve /metrics to anyone; the controller's needs the registration
    token (key registration-token of vpool-secrets), so it has a monitor of its own."""
    endpoint = {"port": "http", "path": "/metrics", "interval": "15s"}
    token = {"name": SECRETS, "key": "registration-token"}
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": meta(name, NAME_LABELS),
            "spec": {
                "selector": {
                    "matchLabels": {METRICS_LABEL: "true"},
                    "matchExpressions": [{"key": COMPONENT, "operator": "In", "values": components}],
                },
                "endpoints": [
                    endpoint if not auth else {**endpoint, "authorization": {"credentials": token}}
                ],
                "targetLabels": [COMPONENT],
                "podTargetLabels": [MODEL_LABEL],
            },
        }
        for name, components, auth in (
            ("vpool", ["gateway", "worker"], False),
            ("vpool-controller", ["controller"], True),
        )
    ]
