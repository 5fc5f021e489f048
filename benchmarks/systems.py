"""How to start the stub backend and each system under test in front of it.

Every gateway runs as its users would start it, with two changes made the same way for all:
logs at warning level (no line per request: vpool writes none either), and no client
authentication (vpool serves 127.0.0.1 open when no key is configured; LiteLLM needs
`dangerously_permit_weak_or_unset_master_key` for that). vllm-router gets `round_robin`:
its `power_of_two` refuses a single worker, and with one worker every policy picks it.
`vpool-prev` is vpool from another commit (`--baseline-ref`), started exactly as `vpool` is,
from a temporary `git worktree` of that commit, so one run gives the new gateway's ratio to
the previous one on the same machine, minutes apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cases import MODEL, STUB_DIM, STUB_EVENTS
from processes import Process, ProcessGroup, StartupError, free_ports, pinning_problem, wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SYSTEMS = ("direct", "vpool", "vllm-router", "litellm")
BASELINE = "vpool-prev"  # vpool from `--baseline-ref`: compare.py only, it needs the checkout
PEERS = {"vllm-router": "vllm-router", "litellm": "litellm"}  # system -> executable
REDIS_URL = "redis://127.0.0.1:6379/0"
STARTUP_TIMEOUT_S = {"vpool": 60.0, BASELINE: 60.0, "vllm-router": 60.0, "litellm": 120.0}


@dataclass
class Running:
    """A system ready for load: where to send it, and whose memory is the gateway's."""

    name: str
    base_url: str
    pid: int
    process: Process | None  # None for `direct`, which is the backend itself


@dataclass
class Launch:
    """What every launcher needs."""

    group: ProcessGroup
    backend: Running
    cpu: int | None
    port_base: int
    peers_venv: Path | None
    gateway_processes: int = 1
    baseline: Path | None = None  # the checkout `vpool-prev` runs from


def find_peer(system: str, peers_venv: Path | None) -> Path | None:
    """A peer's executable: in `--peers-venv`, on PATH, or in the repository's `.peers-venv`."""
    executable = PEERS[system]
    candidates = [peers_venv / "bin" / executable] if peers_venv else []
    on_path = shutil.which(executable)
    candidates += [Path(on_path)] if on_path else []
    candidates.append(REPO / ".peers-venv" / "bin" / executable)
    return next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=2) as response:
        return json.loads(response.read())


def lists_model(base_url: str) -> bool:
    try:
        listing = _get_json(base_url + "/v1/models")
    except (OSError, ValueError):
        return False
    data = listing.get("data", []) if isinstance(listing, dict) else []
    return any(isinstance(m, dict) and m.get("id") == MODEL for m in data)


def start_backend(
    group: ProcessGroup,
    port: int,
    cpu: int | None,
    events: int = STUB_EVENTS,
    event_delay_ms: float = 0.0,
) -> Running:
    argv = [
        sys.executable, str(HERE / "stub_backend.py"), "--port", str(port), "--model", MODEL,
        "--events", str(events), "--dim", str(STUB_DIM),
    ]  # fmt: skip
    if event_delay_ms:
        argv += ["--event-delay-ms", str(event_delay_ms)]
    process = group.start("stub", argv, cpu)
    url = f"http://127.0.0.1:{port}"
    wait_until(process, lambda: lists_model(url), 30.0, "serving")
    return Running("direct", url, process.pid, process)


def start_system(name: str, launch: Launch) -> Running:
    """Start `name` in front of the backend and wait until it routes to the stub model."""
    if name == "direct":
        return Running("direct", launch.backend.base_url, launch.backend.pid, None)
    if name in ("vpool", BASELINE):
        process, url = start_vpool(name, launch)
    elif name == "vllm-router":
        process, url = _start_vllm_router(launch)
    elif name == "litellm":
        process, url = _start_litellm(launch)
    else:
        raise ValueError(f"unknown system {name}")
    wait_until(process, lambda: lists_model(url), STARTUP_TIMEOUT_S[name], f"listing `{MODEL}`")
    return Running(name, url, process.pid, process)


def start_vpool(
    name: str,
    launch: Launch,
    gateway_options: str = "",
    split: bool = False,
    controller_cpu: int | None = None,
) -> tuple[Process, str]:
    """`vpool up` in one process; with several gateway processes (or `split`), split mode
    over Redis (`vpool controller` + `vpool gateway --processes N`), where the gateway is
    measured, the controller on `controller_cpu` (default: the gateway's core).
    `gateway_options` are more `gateway:` settings, in YAML flow style ("keys: [...]").

    `vpool-prev` is the same from the baseline checkout: `PYTHONPATH` and the working
    directory there, so its `vpool` package shadows this checkout's editable install."""
    checkout, env = REPO, None
    if name == BASELINE:
        if launch.baseline is None:
            raise StartupError(f"{BASELINE} needs a checkout of the previous commit: pass --baseline-ref")
        checkout = launch.baseline
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(checkout), os.environ.get("PYTHONPATH")) if p)}
    imported = vpool_imported(checkout, env)
    print(f"  {name}: imports {imported}", flush=True)
    if name == BASELINE and not imported.is_relative_to(checkout.resolve()):
        raise StartupError(f"{BASELINE} would import {imported}, not the checkout at {checkout}")
    port, controller_port = free_ports(2, launch.port_base)
    config = launch.group.log_dir / f"{name}.yaml"
    split = split or launch.gateway_processes > 1
    prefix = f"bench-{os.getpid()}-{name}"  # a fresh registry per system: none sees the last one's records
    registry = f"registry: {{url: '{REDIS_URL}', key_prefix: '{prefix}'}}\n" if split else ""
    config.write_text(
        f"gateway: {{host: 127.0.0.1, port: {port}, processes: {launch.gateway_processes}"
        + (f", {gateway_options}" if gateway_options else "")
        + "}\n"
        f"controller: {{host: 127.0.0.1, port: {controller_port}}}\n"
        f"cache_dir: {launch.group.log_dir / (name + '-cache')}\n"
        + registry
        + "endpoints:\n"
        f"  - url: {launch.backend.base_url}\n"
        f"    models: [{MODEL}]\n"
    )  # fmt: skip
    # This interpreter's vpool: `PYTHONPATH=/other/checkout` benchmarks another copy.
    vpool = [sys.executable, "-m", "vpool.cli"]
    url = f"http://127.0.0.1:{port}"
    if not split:
        up = [*vpool, "up", "--config", str(config)]
        return launch.group.start(name, up, launch.cpu, env=env, cwd=checkout), url
    controller = [*vpool, "controller", "--config", str(config)]
    where = launch.cpu if controller_cpu is None else controller_cpu
    launch.group.start(f"{name}-controller", controller, where, env=env, cwd=checkout)
    gateway = [*vpool, "gateway", "--config", str(config)]
    return launch.group.start(name, gateway, launch.cpu, env=env, cwd=checkout), url


def vpool_imported(checkout: Path, env: dict[str, str] | None) -> Path:
    """The `vpool/__init__.py` a vpool process started in `checkout` with `env` would import:
    proof that `vpool-prev` runs the old code and not this checkout's editable install."""
    done = subprocess.run(
        [sys.executable, "-c", "import vpool; print(vpool.__file__)"],
        capture_output=True, text=True, cwd=checkout, env={**os.environ, **(env or {})}, timeout=30,
    )  # fmt: skip
    if done.returncode != 0:
        raise StartupError(f"`import vpool` fails in {checkout}:\n{done.stderr.strip()[-2000:]}")
    return Path(done.stdout.strip()).resolve()


def resolve_commit(ref: str) -> str:
    """The full commit `ref` names in this repository; StartupError if none."""
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise StartupError(f"--baseline-ref {ref!r} names no commit in {REPO}")
    return done.stdout.strip()


@contextlib.contextmanager
def baseline_checkout(commit: str) -> Iterator[Path]:
    """A detached `git worktree` of `commit` in a fresh temp directory, removed on the way out
    (Ctrl-C and failures included), so `vpool-prev` leaves nothing behind in the repository."""
    path = Path(tempfile.mkdtemp(prefix="vpool-baseline-"))
    try:
        added = subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), commit],
            capture_output=True, text=True,
        )  # fmt: skip
        if added.returncode != 0:
            raise StartupError(f"git worktree add {commit} failed: {added.stderr.strip()}")
        print(f"  {BASELINE}: commit {commit[:12]} checked out in {path}", flush=True)
        yield path
    finally:
        git = ["git", "-C", str(REPO), "worktree"]
        subprocess.run([*git, "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)  # what `remove` left, if it failed
        subprocess.run([*git, "prune"], capture_output=True)


def _peer(name: str, launch: Launch) -> Path:
    executable = find_peer(name, launch.peers_venv)
    if executable is None:
        raise StartupError(f"{name} is not installed")
    return executable


def _start_vllm_router(launch: Launch) -> tuple[Process, str]:
    backends = [launch.backend.base_url]
    return start_vllm_router(launch.group, backends, launch.cpu, launch.port_base, launch.peers_venv)


def start_vllm_router(
    group: ProcessGroup,
    worker_urls: list[str],
    cpu: int | None,
    port_base: int,
    peers_venv: Path | None,
    policy: str = "round_robin",
    name: str = "vllm-router",
) -> tuple[Process, str]:
    """vllm-router in front of `worker_urls` with `policy` (prefix_cost.py runs `cache_aware`)."""
    executable = find_peer("vllm-router", peers_venv)
    if executable is None:
        raise StartupError("vllm-router is not installed")
    port, metrics_port = free_ports(2, port_base)
    argv = [
        str(executable),
        "--worker-urls", *worker_urls,
        "--policy", policy,
        "--host", "127.0.0.1", "--port", str(port),
        # Its default Prometheus port is fixed (29000): taken if two runs share a machine.
        "--prometheus-port", str(metrics_port),
        "--worker-startup-check-interval", "1",
        "--log-level", "warning",
    ]  # fmt: skip
    return group.start(name, argv, cpu), f"http://127.0.0.1:{port}"


def _start_litellm(launch: Launch) -> tuple[Process, str]:
    (port,) = free_ports(1, launch.port_base)
    config = launch.group.log_dir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        f"    litellm_params: {{model: openai/{MODEL}, api_base: '{launch.backend.base_url}/v1', "
        "api_key: unused}\n"
        "general_settings:\n"
        "  dangerously_permit_weak_or_unset_master_key: true\n"
    )
    env = {
        # Never reach the network: the cost map ships inside the package.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        # Also sets uvicorn's level, which turns its per-request access log off.
        "LITELLM_LOG": "WARNING",
        "LITELLM_MODE": "PRODUCTION",
    }
    argv = [
        str(_peer("litellm", launch)), "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    return launch.group.start("litellm", argv, launch.cpu, env=env, cwd=launch.group.log_dir), (
        f"http://127.0.0.1:{port}"
    )


# ---------------------------------------------------------------------------------------------
# Options every benchmark that starts systems shares


def add_launch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers-venv", type=Path, help="virtual environment holding vllm-router, litellm")
    parser.add_argument("--gateway-cpu", type=int, default=1, help="core for the gateway under test")
    parser.add_argument("--load-cpu", type=int, default=0, help="core for the stub and the load generators")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--base-port", type=int, default=18100, help="first port to look for free ones")
    parser.add_argument("--log-dir", type=Path, help="where process logs go (default: a new temp dir)")
    parser.add_argument(
        "--gateway-processes", type=int, default=1,
        help="vpool gateway processes on one port; >1 runs split mode over Redis at " + REDIS_URL,
    )  # fmt: skip


def cores(args: argparse.Namespace) -> tuple[int | None, int | None, str | None]:
    """(gateway core, load core, why not pinned): both None when pinning is off or impossible."""
    if args.no_pin:
        return None, None, None
    problem = pinning_problem([args.gateway_cpu, args.load_cpu])
    if problem:
        return None, None, f"not pinned to cores: {problem}; figures are noisier"
    return args.gateway_cpu, args.load_cpu, None


def log_directory(args: argparse.Namespace, prefix: str) -> Path:
    directory: Path = args.log_dir or Path(tempfile.mkdtemp(prefix=prefix))
    directory.mkdir(parents=True, exist_ok=True)
    return directory
