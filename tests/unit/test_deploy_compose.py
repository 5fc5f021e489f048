"""docker-compose.yml as Debian's docker-compose (1.29) reads it, and every vpool service in
it as vpool itself reads it: its command line parsed by vpool's own CLI (parsed, never run),
the config file it mounts loaded by vpool's own Settings. This machine has no Docker engine,
so nothing is started: what `docker compose up` would do is read from the resolved file."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml

from tests.unit.test_deploy_images import Stage, dockerfile_stages, exec_form, healthcheck_command
from vpool.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_COMPOSE = shutil.which("docker-compose") or (
    "/usr/bin/docker-compose" if Path("/usr/bin/docker-compose").exists() else None
)
CONTROL_PLANE = {"redis", "controller", "gateway", "prometheus", "grafana"}

pytestmark = pytest.mark.skipif(
    DOCKER_COMPOSE is None, reason="needs Debian's docker-compose (apt-get install -y docker-compose)"
)


def run_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """docker-compose on the repository's file, with none of this machine's variables (so
    the file's own defaults are what is checked) unless `env` gives some."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [str(DOCKER_COMPOSE), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


@cache
def resolved(profile: str | None = None) -> dict[str, Any]:
    """The file as docker-compose resolves it (anchors merged, variables interpolated)."""
    result = run_compose(*(["--profile", profile] if profile else []), "config")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert isinstance(data, dict)
    return data


def services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    return resolved(profile)["services"]


def started_by(profile: str | None) -> set[str]:
    """What `docker compose [--profile P] up` starts: services with no profile, and those of
    P. (docker-compose 1.29's `config` lists every service whatever --profile says.)"""
    return {
        name
        for name, svc in services(profile).items()
        if not svc.get("profiles") or (profile is not None and profile in svc["profiles"])
    }


@cache
def vpool_cli() -> Any:
    """vpool's command tree as typer builds it (typer 0.29 carries its own click)."""
    from vpool.cli import app

    return typer.main.get_command(app)


def parse_vpool_args(args: list[str]) -> Any:
    """Parse `vpool ARGS...` with vpool's own CLI without running it, and return the parsed
    context (its `.command.name`, its `.params` with defaults filled in). An unknown command
    or option, a bad value or a missing required one raises typer's usage error (a
    TyperException with exit code 2, as the real command would exit). None for `--help`."""
    command = vpool_cli()
    ctx = None
    rest = list(args)
    while hasattr(command, "commands"):  # a group: pick the subcommand
        if not rest or rest[0] not in command.commands:
            raise UnknownCommand(f"vpool has no command {rest[:1]}")
        name, rest = rest[0], rest[1:]
        ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True) if ctx else None
        command = command.commands[name]
    try:
        return command.make_context(command.name, rest, parent=ctx, resilient_parsing=False)
    except typer.Exit as done:  # --help
        assert done.exit_code == 0
        return None


class UnknownCommand(typer.TyperException):
    exit_code = 2


def image_of(svc: dict[str, Any]) -> Stage:
    build = svc["build"]
    dockerfile = Path(build["context"]) / build["dockerfile"]
    stages = dockerfile_stages(dockerfile)
    return stages[build["target"]] if "target" in build else list(stages.values())[-1]


def vpool_services(profile: str | None = None) -> dict[str, dict[str, Any]]:
    """The services that run vpool: those built from deploy/docker."""
    return {n: s for n, s in services(profile).items() if "build" in s}


def command_line(svc: dict[str, Any]) -> list[str]:
    """ENTRYPOINT (the service's, else the image's) then the command."""
    entrypoint = svc.get("entrypoint") or exec_form(image_of(svc).last("ENTRYPOINT") or "[]")
    return [*entrypoint, *svc.get("command", [])]


def parsed(svc: dict[str, Any]) -> Any:
    line = command_line(svc)
    assert line[0] == "vpool", f"not a vpool command line: {line}"
    ctx = parse_vpool_args(line[1:])
    assert ctx is not None
    return ctx


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(value) * units[unit]
    assert total > 0, duration
    return total


def mounted_config(svc: dict[str, Any], container_path: Path) -> Path:
    """The repository file a service sees at `container_path`, through its bind mounts."""
    for volume in svc.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("/") and Path(target) == container_path:
            return Path(source)
    raise AssertionError(f"nothing is mounted at {container_path}")


def service_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service's vpool process loads them: its --config file (through its
    mount), under its environment."""
    svc = services()[name]
    ctx = parsed(svc)
    for key in [k for k in os.environ if k.startswith("VPOOL_")]:
        monkeypatch.delenv(key)
    for key, value in (svc.get("environment") or {}).items():
        monkeypatch.setenv(key, value or "")
    return load_settings(mounted_config(svc, ctx.params["config"]))


# --- Debian's docker-compose accepts the file ---------------------------------------------


@pytest.mark.parametrize("profile", [None, "cpu", "gpu"])
def test_docker_compose_accepts_the_file_with_each_profile(profile: str | None) -> None:
    assert services(profile)
    result = run_compose("config", "--profiles")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"cpu", "gpu"}


def test_docker_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    # The acceptance above means something: a typo'd key is refused.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("stop_grace_period: 40s", "stop_grace: 40s"))
    result = subprocess.run(
        [str(DOCKER_COMPOSE), "-f", str(broken), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "stop_grace" in result.stderr


def test_each_profile_starts_the_control_plane_and_its_own_workers() -> None:
    assert started_by(None) == CONTROL_PLANE
    cpu_workers = started_by("cpu") - CONTROL_PLANE
    gpu_workers = started_by("gpu") - CONTROL_PLANE
    assert cpu_workers and gpu_workers and not cpu_workers & gpu_workers
    for name in cpu_workers:
        assert services()[name]["build"]["dockerfile"] == "deploy/docker/worker-cpu.Dockerfile"
    for name in gpu_workers:
        assert services()[name]["build"]["dockerfile"] == "deploy/docker/worker-gpu.Dockerfile"
    # One worker per model, and the CPU fleet serves vpool's two built-in models: nothing to
    # download on a laptop.
    cpu_models = {parsed(services()[n]).params["model"] for n in cpu_workers}
    assert cpu_models == {"builtin:tiny-chat", "builtin:all-MiniLM-L6-v2"}


def test_gpu_worker_reserves_an_nvidia_gpu_shares_host_ipc_and_caches_weights() -> None:
    (name,) = started_by("gpu") - CONTROL_PLANE
    svc = services()[name]
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert svc.get("ipc") == "host" or svc.get("shm_size")
    assert "HF_TOKEN" in svc["environment"]
    # The hub cache the image points at (HF_HOME) lies on a named volume.
    env = " ".join(image_of(svc).effective("ENV"))
    hf_home = Path(re.search(r"HF_HOME=(\S+)", env)[1])  # type: ignore[index]
    named = set(resolved()["volumes"])
    targets = [Path(v.split(":")[1]) for v in svc["volumes"] if v.split(":")[0] in named]
    assert any(hf_home.is_relative_to(t) for t in targets)
    # vLLM's tensor parallel size matches the GPUs reserved.
    assert parsed(svc).params["tensor_parallel_size"] == int(device["count"])


def test_redis_keeps_its_data_on_a_named_volume_with_append_only_persistence() -> None:
    redis = services()["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    sources = {v.split(":")[0]: v.split(":")[1] for v in redis["volumes"]}
    assert sources.get("redis-data") == "/data" and "redis-data" in resolved()["volumes"]


# --- every vpool service's command line parses with vpool's own CLI -----------------------


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_every_vpool_service_command_line_parses_with_vpools_cli(profile: str) -> None:
    names = vpool_services(profile)
    assert {"controller", "gateway"} <= set(names)
    for name, svc in names.items():
        ctx = parsed(svc)
        assert ctx.command.name in ("controller", "gateway", "worker"), name


def test_a_broken_service_command_line_fails_the_same_check() -> None:
    good = services()["tiny-chat"]["command"]
    broken = {
        "No such option": [*good, "--no-such-flag"],
        "Invalid value for '--port'": [c if not c.startswith("--port=") else "--port=eighty" for c in good],
        "Missing option '--model'": [c for c in good if not c.startswith("--model")],
        "no command": ["wroker", *good[1:]],
    }
    for message, command in broken.items():
        with pytest.raises(typer.TyperException) as refused:
            parsed({**services()["tiny-chat"], "command": command})
        assert refused.value.exit_code == 2
        assert message in refused.value.format_message()


def test_workers_bind_every_address_and_register_with_the_controller_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller = service_settings("controller", monkeypatch).controller
    all_services = services()
    for name, svc in vpool_services().items():
        ctx = parsed(svc)
        if ctx.command.name != "worker":
            continue
        # Bound to 0.0.0.0, a worker advertises its container hostname, which Docker's DNS
        # resolves for the gateways; a loopback bind would be unreachable.
        assert ctx.params["host"] == "0.0.0.0" and ctx.params["advertise_url"] is None, name
        url = urlsplit(ctx.params["controller"])
        assert url.hostname in all_services and url.hostname == "controller", name
        assert url.port == controller.port, name
        # The image's HEALTHCHECK asks the port the worker listens on.
        health = next(w for w in healthcheck_command(image_of(svc)) if w.startswith("http"))
        assert urlsplit(health).port == ctx.params["port"], name
        assert svc["depends_on"]["controller"]["condition"] == "service_healthy"


def test_workers_have_time_to_drain_before_docker_kills_them() -> None:
    for name, svc in {**vpool_services("cpu"), **vpool_services("gpu")}.items():
        ctx = parsed(svc)
        if ctx.command.name == "worker":
            drain = ctx.params["drain_timeout"] + ctx.params["drain_delay"]
            assert seconds(svc["stop_grace_period"]) > drain, name


# --- the config file the services mount ---------------------------------------------------


def test_controller_and_gateway_config_validates_with_vpools_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = set(services())
    for name in ("controller", "gateway"):
        settings = service_settings(name, monkeypatch)
        registry = urlsplit(settings.registry.url)
        assert registry.scheme == "redis" and registry.hostname in names
        assert registry.hostname == "redis" and registry.port == 6379
    gateway = service_settings("gateway", monkeypatch).gateway
    controller = service_settings("controller", monkeypatch).controller
    assert gateway.host == "0.0.0.0" and controller.host == "0.0.0.0"
    # Compose publishes the ports the processes listen on.
    assert services()["gateway"]["ports"][0].endswith(f":{gateway.port}/tcp")
    assert services()["controller"]["ports"][0].endswith(f":{controller.port}/tcp")
    # The gateway stops within its grace period, streams included.
    assert seconds(services()["gateway"]["stop_grace_period"]) > gateway.graceful_shutdown_s


def test_a_broken_config_file_is_refused_by_the_same_loader(tmp_path: Path) -> None:
    text = (ROOT / "deploy/compose/vpool.yaml").read_text()
    for broken in (
        text.replace("no_auth: true", "no_auth: false"),  # open on 0.0.0.0 without saying so
        text.replace("redis://redis:6379/0", "http://redis:6379"),
        text + "\ngatway: {}\n",
    ):
        path = tmp_path / "vpool.yaml"
        path.write_text(broken)
        with pytest.raises(ConfigError):
            load_settings(path)


def test_an_open_gateway_is_published_on_the_hosts_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = service_settings("gateway", monkeypatch).gateway
    assert gateway.is_open and gateway.no_auth
    for name, svc in services().items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"


def test_api_keys_from_the_environment_close_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_compose("config", env={"VPOOL_API_KEYS": "sk-a,sk-b"})
    assert result.returncode == 0, result.stderr
    env = yaml.safe_load(result.stdout)["services"]["gateway"]["environment"]
    for key in [k for k in os.environ if k.startswith("VPOOL_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value or "")
    settings = load_settings(ROOT / "deploy/compose/vpool.yaml")
    assert settings.gateway.api_keys == ["sk-a", "sk-b"] and not settings.gateway.is_open


# --- scaling, mounts --------------------------------------------------------------------


def test_gateway_scales_on_a_host_port_range_and_by_service_name() -> None:
    gateway = services()["gateway"]
    (port,) = gateway["ports"]
    match = re.fullmatch(r"127\.0\.0\.1:(\d+)-(\d+):(\d+)/tcp", port)
    assert match, f"a fixed host port cannot take --scale gateway=3: {port}"
    assert int(match[2]) - int(match[1]) + 1 >= 3
    # Nothing that names one container: scaled replicas would collide.
    for name, svc in services().items():
        assert "container_name" not in svc, name
        if name == "gateway" or ("build" in svc and "worker" in command_line(svc)[1:2]):
            assert "hostname" not in svc, name


def test_every_bind_mount_source_is_in_the_repository() -> None:
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).is_relative_to(ROOT), f"{name} mounts {source}"
                assert Path(source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_prometheus_and_grafana_get_vpools_scrape_config_and_dashboard() -> None:
    prometheus, grafana = services()["prometheus"], services()["grafana"]
    mounts = {
        Path(v.split(":")[0]).relative_to(ROOT).as_posix(): v.split(":")[1]
        for svc in (prometheus, grafana)
        for v in svc["volumes"]
        if v.startswith("/")
    }
    assert mounts["deploy/prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["deploy/grafana/vpool.json"] == "/var/lib/grafana/dashboards/vpool.json"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_prometheus_discovers_targets_from_the_controller_service_and_grafana_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    controller = service_settings("controller", monkeypatch).controller
    prometheus = services()["prometheus"]
    scrape = yaml.safe_load(mounted_config(prometheus, Path("/etc/prometheus/prometheus.yml")).read_text())
    sd_urls = [sd["url"] for job in scrape["scrape_configs"] for sd in job.get("http_sd_configs", [])]
    assert sd_urls
    for url in map(urlsplit, sd_urls):
        assert (url.hostname, url.port, url.path) == ("controller", controller.port, "/v1/targets")
    grafana = services()["grafana"]
    provisioning = mounted_config(grafana, Path("/etc/grafana/provisioning"))
    (datasources,) = (provisioning / "datasources").glob("*.y*ml")
    urls = [urlsplit(d["url"]) for d in yaml.safe_load(datasources.read_text())["datasources"]]
    published = {int(p.rsplit(":", 1)[1].split("/")[0]) for p in prometheus["ports"]}
    assert any(u.hostname == "prometheus" and u.port in published for u in urls)
