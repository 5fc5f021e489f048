"""The Kubernetes tree (deploy/kubernetes and what `vpool deploy kubernetes` writes), checked
with no cluster: `kubectl kustomize` renders every tree offline, and every rendered object is
validated against the Kubernetes API's JSON schemas bundled in the `kubernetes-validate`
package (strict: an unknown field fails). The ServiceMonitor is a Prometheus Operator CRD
those schemas lack: it is validated against the small schema below, written from the CRD's
fields that vpool uses. Then what a user relies on is held against vpool's own code: the GPU
request is the planner's layout, probes ask routes the services really serve, the pod IP
reaches the worker's advertise flag, the grace period covers the drain, the network policies
admit whom they should, and every container's command line parses with vpool's own CLI.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer
import yaml
from fastapi.testclient import TestClient
from typer._click.exceptions import UsageError

from vpool.catalog.catalog import load_catalog
from vpool.catalog.planner import plan
from vpool.cli import app
from vpool.cli.common import parse_engine_args
from vpool.config import ControllerSettings, Settings, load_settings
from vpool.controller.app import create_controller_app
from vpool.deployment.kubernetes import TreeOptions, example_files, render_tree, write_tree
from vpool.deployment.workers import plan_workers
from vpool.gateway.app import create_app
from vpool.registry.memory_backend import MemoryRegistry

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
TREES = ["base", "overlays/cpu-laptop", "overlays/gpu", "overlays/external-redis"]
# The oldest Kubernetes the tree is written for, and the newest schemas the package bundles.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]

# monitoring.coreos.com/v1 ServiceMonitor, the fields vpool writes (from the operator's CRD).
SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": SELECTOR,
                "namespaceSelector": {"type": "object"},
                "targetLabels": {"type": "array", "items": {"type": "string"}},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["key"],
                                        "properties": {
                                            "name": {"type": "string"},
                                            "key": {"type": "string"},
                                            "optional": {"type": "boolean"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(autouse=True)
def no_user_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPOOL_CATALOG", raising=False)


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (apt-get install -y kubectl): it renders kustomize offline")
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def validate(obj: dict[str, Any]) -> None:
    """Raise when `obj` is not a valid object of its kind (any of K8S_VERSIONS)."""
    if obj.get("kind") == "ServiceMonitor":
        jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def generate(tmp_path: Path, *models: str, gpu: str | None = None, **options: Any) -> list[dict[str, Any]]:
    catalog = load_catalog(environ={})
    workers = plan_workers(list(models), catalog, gpu=gpu, max_model_len=options.pop("max_model_len", None))
    out = tmp_path / "tree"
    write_tree(render_tree(workers, TreeOptions(**options)), out)
    return kustomize(out)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    assert len(matches) == 1, f"{kind} {name}: {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def workers_of(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        o
        for o in objects
        if o["kind"] == "Deployment"
        and o["spec"]["template"]["metadata"]["labels"].get(COMPONENT) == "worker"
    ]


COMPONENT = "app.kubernetes.io/component"


def cli_params(args: list[str]) -> dict[str, Any]:
    """`vpool ARGS` parsed by vpool's own CLI, as the container would run it, not invoked
    (typer 0.29 carries its own click): a flag vpool lacks raises its UsageError."""
    group: Any = typer.main.get_command(app)
    command = group.commands[args[0]]
    return dict(command.make_context(args[0], list(args[1:])).params)


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# --- the trees render and validate ----------------------------------------------------------


def test_the_repository_tree_is_what_the_generator_writes() -> None:
    expected = example_files(load_catalog(environ={}))
    stale = [
        path
        for path, text in expected.items()
        if not (KUBE / path).is_file() or (KUBE / path).read_text() != text
    ]
    assert not stale, (
        f"deploy/kubernetes is out of date for {stale}: run "
        "python -c 'from vpool.deployment.kubernetes import write_base; write_base()'"
    )
    on_disk = {str(p.relative_to(KUBE)) for p in (KUBE / "base").rglob("*") if p.is_file()}
    assert on_disk == {p for p in expected if p.startswith("base/")}


@pytest.mark.parametrize("tree", TREES)
def test_every_object_of_every_tree_validates(tree: str) -> None:
    objects = kustomize(KUBE / tree)
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "NetworkPolicy", "ConfigMap"}
    for obj in objects:
        validate(obj)


def test_a_generated_tree_validates(tmp_path: Path) -> None:
    objects = generate(tmp_path, "tiny-chat", "all-MiniLM-L6-v2", "Meta-Llama-3.1-70B-Instruct")
    kinds = [o["kind"] for o in objects]
    for kind in ("HorizontalPodAutoscaler", "PodDisruptionBudget", "PersistentVolumeClaim", "ServiceMonitor"):
        assert kind in kinds
    assert len(workers_of(objects)) == 3
    for obj in objects:
        validate(obj)


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown apiVersion": lambda d: d.update(apiVersion="apps/v1beta9"),
    "misspelled field": lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=30),
    "replicas as text": lambda d: d["spec"].update(replicas="two"),
    "probe port as a list": lambda d: container(d)["readinessProbe"]["httpGet"].update(port=[8000]),
    "GPU count as an object": lambda d: container(d)["resources"]["limits"].update(
        {"nvidia.com/gpu": {"n": 1}}
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_validator_rejects_a_broken_object(tmp_path: Path, mutation: str) -> None:
    objects = generate(tmp_path, "tiny-chat", gpu="A10")
    worker = copy.deepcopy(workers_of(objects)[0])
    validate(worker)
    MUTATIONS[mutation](worker)
    with pytest.raises((kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError)):
        validate(worker)


def test_the_service_monitor_schema_rejects_a_broken_monitor() -> None:
    monitor = find(kustomize(KUBE / "base"), "ServiceMonitor", "vpool-controller")
    validate(monitor)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["path"] = "metrics"  # not a path
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoint"] = broken["spec"].pop("endpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_kustomize_refuses_a_tree_missing_a_file(tmp_path: Path) -> None:
    out = tmp_path / "tree"
    workers = plan_workers(["tiny-chat"], load_catalog(environ={}))
    write_tree(render_tree(workers, TreeOptions()), out)
    (out / "workers" / "tiny-chat.yaml").unlink()
    done = subprocess.run([kubectl(), "kustomize", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "tiny-chat.yaml" in done.stderr


# --- what a user relies on ------------------------------------------------------------------

GPU_CASES = [
    ("Meta-Llama-3.1-70B-Instruct", "H100-80GB"),
    ("Meta-Llama-3.1-8B-Instruct", "A10"),
    ("Qwen2-72B-Instruct", "A100-80GB"),
    ("QwQ-32B", "L40S"),
    ("Mistral-7B-Instruct-v0.3", "T4"),
]


@pytest.mark.parametrize(("model", "gpu"), GPU_CASES)
def test_the_gpu_request_is_the_planners_gpu_count(tmp_path: Path, model: str, gpu: str) -> None:
    entry = load_catalog(environ={}).get(model)
    verdict = plan(entry, gpu=gpu, max_nodes=1)
    assert verdict.fits
    (worker,) = workers_of(generate(tmp_path, model, gpu=gpu))
    c = container(worker)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == verdict.num_gpus
    assert c["resources"]["limits"]["nvidia.com/gpu"] == verdict.num_gpus
    params = cli_params(c["args"])
    assert params["tensor_parallel_size"] == verdict.tensor_parallel_size
    assert params["pipeline_parallel_size"] == verdict.pipeline_parallel_size
    assert params["tensor_parallel_size"] * params["pipeline_parallel_size"] == verdict.num_gpus
    assert c["image"] == "vpool/worker-gpu:0.1.0"


def test_the_70b_model_asks_for_the_four_gpus_the_catalog_publishes(tmp_path: Path) -> None:
    entry = load_catalog(environ={}).get("Meta-Llama-3.1-70B-Instruct")
    assert entry.slurm.gpus_per_node == 4  # the catalog's published layout: TP 4 on 80 GB GPUs
    (worker,) = workers_of(generate(tmp_path, entry.name, gpu="H100-80GB"))
    c = container(worker)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["args"][c["args"].index("--tensor-parallel-size") + 1] == "4"


def test_a_cpu_model_asks_for_no_gpu_and_runs_the_cpu_image(tmp_path: Path) -> None:
    (worker,) = workers_of(generate(tmp_path, "tiny-chat"))
    c = container(worker)
    assert not any("gpu" in key for key in c["resources"]["requests"])
    assert c["image"] == "vpool/worker-cpu:0.1.0"
    assert "tolerations" not in worker["spec"]["template"]["spec"]


def test_the_served_name_max_model_len_and_engine_args_reach_the_worker(tmp_path: Path) -> None:
    catalog = load_catalog(environ={})
    objects = generate(tmp_path, "tiny-chat", "Meta-Llama-3.1-8B-Instruct", gpu="H100", max_model_len=None)
    by_model = {
        w["spec"]["template"]["metadata"]["annotations"]["vpool.io/model-name"]: w
        for w in workers_of(objects)
    }
    for name, worker in by_model.items():
        entry = catalog.get(name)
        params = cli_params(container(worker)["args"])
        assert params["served_name"] == [entry.name]
        assert params["model"] == entry.model
        assert params["max_model_len"] == entry.max_model_len
        assert parse_engine_args(params["engine_arg"] or []) == entry.vllm_engine_args()

    shorter = generate(tmp_path / "short", "Meta-Llama-3.1-8B-Instruct", gpu="H100", max_model_len=8192)
    assert cli_params(container(workers_of(shorter)[0])["args"])["max_model_len"] == 8192


def test_the_pod_ip_reaches_the_workers_advertise_url(tmp_path: Path) -> None:
    (worker,) = workers_of(generate(tmp_path, "tiny-chat"))
    c = container(worker)
    env = env_of(c)
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["VPOOL_WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    params = cli_params(c["args"])
    # The kubelet expands $(POD_IP) in args from the container's env.
    port = c["ports"][0]["containerPort"]
    assert params["advertise_url"].replace("$(POD_IP)", "10.1.2.3") == f"http://10.1.2.3:{port}"
    assert params["port"] == port and params["host"] == "0.0.0.0"
    assert params["controller"] == "http://vpool-controller:8001"
    controller = find(objects_of_base(), "Service", "vpool-controller")
    assert controller["spec"]["ports"][0]["port"] == 8001


def objects_of_base() -> list[dict[str, Any]]:
    return kustomize(KUBE / "base")


def base_with_a_worker() -> list[dict[str, Any]]:
    return [*objects_of_base(), find(kustomize(KUBE / "overlays/cpu-laptop"), "Deployment", "vpool-worker")]


def test_the_hub_token_comes_from_an_optional_secret(tmp_path: Path) -> None:
    (worker,) = workers_of(generate(tmp_path, "Meta-Llama-3.1-8B-Instruct", gpu="H100"))
    ref = env_of(container(worker))["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "vpool-secrets", "key": "hf-token", "optional": True}


def test_workers_have_shared_memory_and_a_model_cache(tmp_path: Path) -> None:
    (worker,) = workers_of(generate(tmp_path, "Meta-Llama-3.1-8B-Instruct", gpu="H100"))
    pod = worker["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container(worker)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    cache = mounts["/cache"]
    env = env_of(container(worker))
    assert env["HF_HOME"]["value"].startswith("/cache/") and cache in volumes
    gpu_overlay = find(kustomize(KUBE / "overlays/gpu"), "Deployment", "vpool-worker-meta-llama")
    overlay_volumes = {v["name"]: v for v in gpu_overlay["spec"]["template"]["spec"]["volumes"]}
    assert overlay_volumes["model-cache"] == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "vpool-model-cache"},
    }


def test_the_grace_periods_cover_the_drains(tmp_path: Path) -> None:
    objects = generate(tmp_path, "tiny-chat")
    (worker,) = workers_of(objects)
    params = cli_params(container(worker)["args"])
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGTERM: leave routing, wait drain_delay, finish in flight for up to drain_timeout.
    assert grace > params["drain_delay"] + params["drain_timeout"]
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    gateway = find(objects, "Deployment", "vpool-gateway")
    settings = settings_from_tree(objects, gateway)
    pre_stop = container(gateway)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > float(pre_stop[1]) + (
        settings.gateway.graceful_shutdown_s
    )
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def settings_from_tree(objects: list[dict[str, Any]], deployment: dict[str, Any]) -> Settings:
    """The settings a pod of `deployment` would load: the ConfigMap's file where its args say,
    with the literal VPOOL_ variables of its env (secrets stood in for)."""
    config_map = find(objects, "ConfigMap", "vpool-config")
    c = container(deployment)
    args = c["args"]
    path = Path(args[args.index("--config") + 1])
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert path.parent == Path(mount["mountPath"])
    saved = dict(os.environ)
    try:
        for name, var in env_of(c).items():
            if "value" in var:
                os.environ[name] = var["value"].replace("$(POD_IP)", "10.1.2.3")
            elif "secretKeyRef" in var.get("valueFrom", {}):
                os.environ[name] = "stand-in-secret"
        file = Path(os.environ.get("TMPDIR", "/tmp")) / f"vpool-k8s-{os.getpid()}.yaml"
        file.write_text(config_map["data"][path.name])
        try:
            params = cli_params(args)
            section = "gateway" if args[0] == "gateway" else "controller"
            return load_settings(file, {section: {"host": params["host"]}})
        finally:
            file.unlink()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_config_map_is_a_config_vpool_loads(tmp_path: Path) -> None:
    objects = generate(tmp_path, "tiny-chat")
    gateway = settings_from_tree(objects, find(objects, "Deployment", "vpool-gateway"))
    assert gateway.gateway.host == "0.0.0.0" and gateway.gateway.api_keys == ["stand-in-secret"]
    assert gateway.gateway.advertise_url == "http://10.1.2.3:8000"
    redis = find(objects, "Service", "vpool-redis")
    assert gateway.registry.url == f"redis://vpool-redis:{redis['spec']['ports'][0]['port']}/0"
    controller = settings_from_tree(objects, find(objects, "Deployment", "vpool-controller"))
    assert (
        controller.controller.port
        == container(find(objects, "Deployment", "vpool-controller"))["ports"][0]["containerPort"]
    )
    assert controller.controller.registration_token == "stand-in-secret"


def test_every_container_command_parses_with_vpools_cli(tmp_path: Path) -> None:
    objects = generate(tmp_path, "tiny-chat", "all-MiniLM-L6-v2", "Meta-Llama-3.1-70B-Instruct", gpu="H100")
    vpool_containers = [
        container(o)
        for o in objects
        if o["kind"] == "Deployment" and container(o).get("command") == ["vpool"]
    ]
    assert len(vpool_containers) == 5  # controller, gateway, three workers
    for c in vpool_containers:
        cli_params(c["args"])  # raises click's UsageError on a flag vpool does not have
    with pytest.raises(UsageError):
        cli_params(["worker", "--model", "x", "--advertise", "http://1.2.3.4:8000"])


def test_probes_ask_routes_the_services_serve(tmp_path: Path) -> None:
    objects = generate(tmp_path, "tiny-chat")
    settings = Settings()
    gateway_app = create_app(settings, MemoryRegistry())
    token = "probe-token"
    controller_app = create_controller_app(ControllerSettings(registration_token=token), MemoryRegistry())
    gateway = container(find(objects, "Deployment", "vpool-gateway"))
    for probe in ("readinessProbe", "livenessProbe"):
        get = gateway[probe]["httpGet"]
        assert get["port"] == gateway["ports"][0]["name"]
        with TestClient(gateway_app) as client:
            assert client.get(get["path"]).status_code == 200

    # The controller's /health needs the registration token: the probe sends it from the env.
    controller = container(find(objects, "Deployment", "vpool-controller"))
    command = controller["readinessProbe"]["exec"]["command"]
    assert command[1] == "/usr/local/bin/vpool-healthcheck"
    url, token_env = command[2], command[command.index("--token-env") + 1]
    assert url.endswith(f":{controller['ports'][0]['containerPort']}/health")
    assert "secretKeyRef" in env_of(controller)[token_env]["valueFrom"]
    path = "/" + url.split("/", 3)[3]
    with TestClient(controller_app) as client:
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"authorization": f"Bearer {token}"}).status_code == 200
        assert client.get("/metrics", headers={"authorization": f"Bearer {token}"}).status_code == 200
    dockerfile = ROOT / "deploy" / "docker" / "gateway.Dockerfile"
    if dockerfile.exists():
        assert command[1] in dockerfile.read_text(), "the gateway image must hold the healthcheck script"

    worker = container(workers_of(objects)[0])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = worker[probe]["httpGet"]
        assert get["port"] == "http" and worker["ports"][0]["name"] == "http"
        assert get["path"] == "/health"
    # The worker's routes are vLLM's: /health is its health router's.
    health = pytest.importorskip("vllm.entrypoints.serve.instrumentator.health")
    assert "/health" in {route.path for route in health.router.routes}  # type: ignore[attr-defined]


def test_services_and_monitors_select_the_pods_they_mean() -> None:
    objects = base_with_a_worker()
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for name, service in services.items():
        selected = [p for p, labels in pods.items() if matches(service["spec"]["selector"], labels)]
        assert selected, f"Service {name} selects no pod"
    assert matches(services["vpool-workers"]["spec"]["selector"], pods["vpool-worker-tiny-chat"])
    monitored = {
        name
        for monitor in (o for o in objects if o["kind"] == "ServiceMonitor")
        for name, service in services.items()
        if selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    }
    assert monitored == {"vpool-gateway", "vpool-workers", "vpool-controller"}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not matches(selector.get("matchLabels", {}), labels):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def admits(policies: list[dict[str, Any]], target: dict[str, str], peer: dict[str, str], port: int) -> bool:
    """Whether a pod labelled `peer` (same namespace) may reach `target`'s pods on `port`."""
    for policy in policies:
        spec = policy["spec"]
        if not selects(spec["podSelector"], target):
            continue
        for rule in spec["ingress"]:
            if port in [p["port"] for p in rule["ports"]] and any(
                selects(source["podSelector"], peer) for source in rule["from"]
            ):
                return True
        return False
    return True  # no policy selects the target: open


def test_network_policies_admit_only_whom_they_should() -> None:
    objects = base_with_a_worker()
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    labels = {
        o["spec"]["template"]["metadata"]["labels"][COMPONENT]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] == "Deployment"
    }
    cli = {"vpool.io/role": "cli"}
    stranger = {"app": "something-else"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    worker, controller, redis = labels["worker"], labels["controller"], labels["redis"]

    assert admits(policies, worker, labels["gateway"], 8000)
    assert admits(policies, worker, controller, 8000)  # the /health probe at registration
    assert admits(policies, worker, prometheus, 8000)
    for other in (cli, stranger, redis, worker):
        assert not admits(policies, worker, other, 8000)
    assert not admits(policies, worker, labels["gateway"], 9999)

    assert admits(policies, controller, worker, 8001) and admits(policies, controller, cli, 8001)
    for other in (stranger, labels["gateway"]):
        assert not admits(policies, controller, other, 8001)

    assert admits(policies, redis, labels["gateway"], 6379) and admits(policies, redis, controller, 6379)
    for other in (worker, cli, stranger):
        assert not admits(policies, redis, other, 6379)
    assert admits(policies, labels["gateway"], stranger, 8000)  # the public API


def test_gateways_autoscale_on_cpu_within_a_disruption_budget() -> None:
    objects = objects_of_base()
    gateway = find(objects, "Deployment", "vpool-gateway")
    hpa = find(objects, "HorizontalPodAutoscaler", "vpool-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container(gateway)["resources"]["requests"]  # utilization is of the request
    pdb = find(objects, "PodDisruptionBudget", "vpool-gateway")
    assert selects(pdb["spec"]["selector"], gateway["spec"]["template"]["metadata"]["labels"])
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]


def test_external_redis_replaces_the_in_cluster_one(tmp_path: Path) -> None:
    for objects in (
        kustomize(KUBE / "overlays/external-redis"),
        generate(tmp_path, "tiny-chat", external_redis=True),
    ):
        assert not [o for o in objects if "redis" in o["metadata"]["name"]]
        for name in ("vpool-gateway", "vpool-controller"):
            ref = env_of(container(find(objects, "Deployment", name)))["VPOOL_REGISTRY__URL"]
            assert ref["valueFrom"]["secretKeyRef"]["name"] == "vpool-redis"


def test_images_and_namespace_options_reach_every_object(tmp_path: Path) -> None:
    images = {
        "gateway": "reg.example.com/vpool/gateway:0.2.0",
        "worker-cpu": "reg.example.com/cpu@sha256:" + "a" * 64,
    }
    objects = generate(tmp_path, "tiny-chat", namespace="llm", images=images)
    assert {o["metadata"].get("namespace", "llm") for o in objects if o["kind"] != "Namespace"} == {"llm"}
    assert find(objects, "Namespace", "llm")
    assert container(find(objects, "Deployment", "vpool-gateway"))["image"] == images["gateway"]
    assert container(find(objects, "Deployment", "vpool-controller"))["image"] == images["gateway"]
    assert container(workers_of(objects)[0])["image"] == images["worker-cpu"]
