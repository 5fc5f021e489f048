"""SkyPilot, through its own CLI: the task YAML, `sky launch`, `sky status`, `sky down`.

This is the only module that knows SkyPilot. A job is one SkyPilot cluster (one cloud VM
with the accelerators asked for) running one `vpool worker`:

- the task (`sky-task.yaml` in the job's directory): `setup` makes a Python 3.11 venv and
  pip-installs vpool with its GPU engine; `run` starts the worker registering back with the
  controller; `file_mounts` mounts the weights' bucket (MOUNT mode) where `--model` points;
  `resources` asks for the accelerators, cloud and region and opens the worker's port;
- `sky launch -c CLUSTER -y --detach-run TASK` runs in the background: it provisions for
  minutes, so a launch answers at once with a PENDING job, and the job's state follows the
  process (its output in `sky-launch.log`, its errors in `sky-launch.err`);
- once it has returned, `sky status -o json CLUSTER` says whether the cluster is UP (the
  worker loads; READY once it registers), still INIT, stopped, or gone;
- `vpool shutdown` runs `sky down -y CLUSTER` (in the background too, `sky-down.log`).

The registration token never goes into the task or onto a command line: `sky launch
--secret VPOOL_REGISTRATION_TOKEN` takes its value from the environment `sky` runs in.

The worker must advertise a URL the controller and the gateways reach: `http://HOST:8080`,
HOST being `VPOOL_ADVERTISE_HOST` when the launch sets it (`--env`), else the VM's public
address, else its address inside the cloud network (`SKYPILOT_NODE_IPS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from vpool.config import ModelSpec
from vpool.errors import InvalidRequest
from vpool.launch import LaunchOverrides, LaunchRequest
from vpool.registry.records import JobRecord, JobState

SKY = "sky"
TASK_FILE = "sky-task.yaml"
LAUNCH_LOG = "sky-launch.log"
LAUNCH_ERR = "sky-launch.err"
DOWN_LOG = "sky-down.log"
WORKER_PORT = 8080
WEIGHTS_MOUNT = "/vpool/weights"
VENV = "~/vpool-venv"
WHEEL_DIR = "/tmp/vpool-wheel"
TOKEN_ENV = "VPOOL_REGISTRATION_TOKEN"
VM_CACHE_DIR = "/tmp/vpool-cache"  # builtin models are generated here on the VM
# How long a `sky status` answer is used again: each call is a Python start and a round trip
# to SkyPilot's API server, and the controller refreshes every job every couple of seconds.
STATUS_MAX_AGE_S = 15.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


# The launch options only a SkyPilot launch takes, and those it has no use for (Slurm's,
# and a weights directory on this host: a VM mounts its weights with --source).
SKYPILOT_ONLY = {"accelerator": "--accelerator", "cloud": "--cloud", "region": "--region",
                 "cluster": "--cluster", "envs": "--env", "source": "--source"}  # fmt: skip
NOT_FOR_SKYPILOT = {"partition": "--partition", "qos": "--qos", "time": "--time", "num_nodes": "--num-nodes",
                    "gpus_per_node": "--gpus-per-node", "cpus_per_task": "--cpus-per-task", "mem": "--mem",
                    "account": "--account", "weights_dir": "--weights-dir"}  # fmt: skip


class SkyPilotError(Exception):
    """A SkyPilot command could not run or failed; the message says which and why."""


def check_options(request: LaunchRequest) -> None:
    """Refuse SkyPilot's options on another launcher, and Slurm's on SkyPilot (400)."""
    o = request.overrides
    if request.launcher != "skypilot":
        for name, flag in SKYPILOT_ONLY.items():
            if getattr(o, name):
                raise InvalidRequest(
                    f"{flag} is for --launcher skypilot, not {request.launcher}.",
                    param=name,
                    code="skypilot_only_option",
                )
        return
    for name, flag in NOT_FOR_SKYPILOT.items():
        if getattr(o, name) is not None:
            raise InvalidRequest(
                f"{flag} is not an option of --launcher skypilot: a cloud VM takes --accelerator, "
                "--cloud and --region, and its weights from --source.",
                param=name,
                code="not_a_skypilot_option",
            )
    if o.accelerator is None:
        raise InvalidRequest(
            "--launcher skypilot needs --accelerator, e.g. A100:1.",
            param="accelerator",
            code="no_accelerator",
        )


def model_on_vm(model: ModelSpec, hub_id: str, accelerator: str, source: str | None) -> ModelSpec:
    """The worker's model on the VM: the mounted bucket, else the hub id (never a path of
    this host); 400 when its tensor x pipeline parallel size needs more GPUs than asked for."""
    need = model.tensor_parallel_size * model.pipeline_parallel_size
    have = accelerator_count(accelerator)
    if need > have:
        raise InvalidRequest(
            f"{model.name} runs at TP {model.tensor_parallel_size} x PP {model.pipeline_parallel_size}, "
            f"{need} GPUs: --accelerator {accelerator} gives {have}.",
            param="accelerator",
            code="too_few_accelerators",
        )
    return model.model_copy(update={"model": WEIGHTS_MOUNT if source else hub_id})


def job_task(
    job_id: str,
    worker_id: str,
    worker_argv: list[str],
    overrides: LaunchOverrides,
    replica: int,
    replicas: int,
    install: str | None,
) -> SkyTask:
    """The task of one job (one replica of a launch)."""
    if overrides.cluster:
        cluster = overrides.cluster if replicas == 1 else f"{overrides.cluster}-{replica}"
    else:
        slug = re.sub(r"[^a-z0-9]+", "-", worker_id.removesuffix(f"-{job_id}").lower()).strip("-")[:24]
        cluster = f"vpool-{slug.strip('-') or 'model'}-{job_id.removeprefix('sky-')}"
    assert overrides.accelerator is not None  # check_options saw to it
    return SkyTask(
        name=cluster,
        accelerator=overrides.accelerator,
        worker_argv=worker_port_argv(worker_argv, WORKER_PORT),
        install=install or default_install(),
        cloud=overrides.cloud,
        region=overrides.region,
        envs={**overrides.envs, "VPOOL_WORKER_ID": worker_id},
        source=overrides.source,
    )


def task_config(task: SkyTask) -> dict[str, object]:
    """What `vpool launch` prints of the task (the environment's names, not its values)."""
    return {
        "cluster": task.name,
        "accelerator": task.accelerator,
        "cloud": task.cloud,
        "region": task.region,
        "source": task.source,
        "envs": sorted(task.envs),
        "install": task.install,
    }


@dataclass(frozen=True)
class SkyTask:
    """What one job's SkyPilot task asks for."""

    name: str  # the cluster's name
    accelerator: str  # NAME[:COUNT], e.g. A100:1
    worker_argv: list[str]  # `vpool worker ...`, argv[0] the interpreter
    install: str  # what setup pip-installs: a requirement, a wheel URL or a local wheel file
    cloud: str | None = None
    region: str | None = None
    envs: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # the weights' bucket, mounted at WEIGHTS_MOUNT
    port: int = WORKER_PORT


def accelerator_count(accelerator: str) -> int:
    """`A100:4` -> 4; `A100` is one."""
    _, _, count = accelerator.partition(":")
    return int(count) if count else 1


def default_install() -> str:
    """This controller's vpool release with its GPU engine, so that workers match it."""
    try:
        return f"vpool[gpu]=={version('vpool')}"
    except PackageNotFoundError:
        return "vpool[gpu]"


def render_task(task: SkyTask) -> str:
    """The task YAML, as `sky launch` (and `sky.Task.from_yaml`) reads it."""
    resources: dict[str, object] = {"accelerators": task.accelerator}
    if task.cloud:
        resources["cloud"] = task.cloud
    if task.region:
        resources["region"] = task.region
    resources["ports"] = [task.port]
    file_mounts: dict[str, object] = {}
    install = task.install
    local_wheel = Path(task.install).expanduser()
    if task.install.endswith(".whl") and local_wheel.is_file():
        remote = f"{WHEEL_DIR}/{local_wheel.name}"
        file_mounts[remote] = str(local_wheel.resolve())
        install = f"vpool[gpu] @ file://{remote}"  # PEP 508: pip and uv both read it
    if task.source:
        file_mounts[WEIGHTS_MOUNT] = {"source": task.source, "mode": "MOUNT"}
    document: dict[str, object] = {
        "name": task.name,
        "resources": resources,
        "envs": dict(task.envs),
    }
    if file_mounts:
        document["file_mounts"] = file_mounts
    document["setup"] = _setup(install)
    document["run"] = _run(task)
    header = (
        "# Written by vpool: one vpool worker on a cloud GPU, registering with the controller.\n"
        f"# `sky launch -c {task.name} {TASK_FILE}` starts the same worker again.\n"
    )
    return header + yaml.dump(document, Dumper=_TaskDumper, sort_keys=False, width=1000)


class _TaskDumper(yaml.SafeDumper):
    """Scripts as YAML block literals (`setup: |`), so the task reads as it runs."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_TaskDumper.add_representer(str, _str)


def _setup(install: str) -> str:
    # Python 3.11 whatever the image has (vpool needs it); uv fetches it if need be.
    return "\n".join(
        [
            "set -euo pipefail",
            "python3 -m pip install --quiet --upgrade uv",
            f"python3 -m uv venv --allow-existing --python 3.11 {VENV}",
            f"python3 -m uv pip install --python {VENV}/bin/python {shlex.quote(install)}",
            "",
        ]
    )


def _run(task: SkyTask) -> str:
    argv = list(task.worker_argv)
    argv[0] = f"{VENV}/bin/python"
    worker = " ".join(a if a == argv[0] else shlex.quote(a) for a in argv)
    return "\n".join(
        [
            "set -euo pipefail",
            "# The address the controller and the gateways reach this worker at.",
            'host="${VPOOL_ADVERTISE_HOST:-}"',
            'if [ -z "$host" ]; then',
            '  host="$(curl -sf --max-time 5 https://checkip.amazonaws.com || true)"',
            "fi",
            'if [ -z "$host" ]; then host="$(echo "$SKYPILOT_NODE_IPS" | head -n1)"; fi',
            f'exec {worker} --advertise-url "http://${{host}}:{task.port}"',
            "",
        ]
    )


def worker_port_argv(argv: list[str], port: int) -> list[str]:
    """`argv` with the worker's port fixed (the one the task opens), not picked at random."""
    out = list(argv)
    if "--port" in out:
        out[out.index("--port") + 1] = str(port)
    else:
        out += ["--port", str(port)]
    return out


@dataclass
class ClusterStatus:
    """One cluster as `sky status -o json` reports it."""

    name: str
    status: str  # INIT, UP, STOPPED, AUTOSTOPPING, PENDING
    reason: str | None = None


def parse_status(text: str) -> dict[str, ClusterStatus]:
    """`sky status -o json` output (a list of cluster records) by cluster name."""
    try:
        records = json.loads(text)
    except ValueError:
        raise SkyPilotError(f"`sky status -o json` did not print JSON: {text.strip()[:200]}") from None
    if not isinstance(records, list):
        raise SkyPilotError("`sky status -o json` did not print a list of clusters")
    found = {}
    for record in records:
        if isinstance(record, dict) and "name" in record:
            reason = record.get("init_status_reason") or record.get("last_event")
            found[record["name"]] = ClusterStatus(
                record["name"], str(record.get("status", "UNKNOWN")), reason
            )
    return found


class SkyPilot:
    """Runs SkyPilot's `sky` command (found on PATH), each call with a timeout."""

    def __init__(self, timeout_s: float = 120.0, executable: str = SKY) -> None:
        self._timeout_s = timeout_s
        self._sky = executable

    def start(
        self, args: list[str], log_dir: Path, out: str, err: str, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """`sky ARGS` in the background (its own session: it outlives a controller restart)."""
        argv = [self._sky, *args]
        with contextlib.ExitStack() as files:
            stdout = files.enter_context((log_dir / out).open("ab"))
            stderr = subprocess.STDOUT if err == out else files.enter_context((log_dir / err).open("ab"))
            try:
                # Starting a process is a fork and an exec: nothing here waits on it.
                return subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
            except FileNotFoundError:
                raise SkyPilotError(_not_installed(self._sky)) from None

    async def status(self, cluster: str) -> ClusterStatus | None:
        """What SkyPilot records of the cluster; None when it knows no such cluster."""
        return parse_status(await self._run(["status", "-o", "json", cluster])).get(cluster)

    async def _run(self, args: list[str]) -> str:
        argv = [self._sky, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            raise SkyPilotError(_not_installed(self._sky)) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SkyPilotError(f"`{shlex.join(argv)}` did not answer within {self._timeout_s:g} s") from None
        if proc.returncode != 0:
            raise SkyPilotError(f"`{shlex.join(argv)}` failed: {last_line(err.decode(errors='replace'))}")
        return out.decode(errors="replace")


def _not_installed(executable: str) -> str:
    return (
        f"`{executable}` is not installed where the controller runs: the skypilot launcher needs "
        "SkyPilot's CLI (pip install 'skypilot[aws]', or [gcp], [azure], ...; then `sky check`)"
    )


def last_line(text: str) -> str:
    """The last line with text in it, without the terminal's colours."""
    lines = [ln.strip() for ln in _ANSI.sub("\n", text).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


class SkyPilotJobs:
    """The skypilot launcher of `JobManager`: starts, follows and stops one cluster per job."""

    def __init__(self, sky: SkyPilot | None = None, status_max_age_s: float = STATUS_MAX_AGE_S) -> None:
        self._sky = sky or SkyPilot()
        self._max_age_s = status_max_age_s
        self._launches: dict[str, subprocess.Popen[bytes]] = {}  # by cluster
        self._downs: dict[str, subprocess.Popen[bytes]] = {}
        self._seen: dict[str, tuple[float, ClusterStatus | None]] = {}

    def launch(self, task: SkyTask, job_dir: Path, token: str | None) -> Path:
        """Write the task into the job's directory and start `sky launch` on it."""
        path = job_dir / TASK_FILE
        path.write_text(render_task(task))
        cluster = task.name
        args = ["launch", "-c", cluster, "-y", "--detach-run"]
        env = dict(os.environ)
        if token:
            args += ["--secret", TOKEN_ENV]
            env[TOKEN_ENV] = token
        self._launches[cluster] = self._sky.start([*args, str(path)], job_dir, LAUNCH_LOG, LAUNCH_ERR, env)
        return path

    async def view(self, job: JobRecord) -> tuple[JobState, str | None]:
        """The job's state as SkyPilot sees it (LAUNCHING once its cluster is UP)."""
        cluster = job.cluster or ""
        log_dir = Path(job.log_dir)
        down = self._downs.get(cluster)
        if down is not None:
            code = down.poll()
            if code is None:
                return job.state, "sky down: tearing the cluster down"
            del self._downs[cluster]
            if code != 0:
                return job.state, f"sky down failed (exit code {code}): {_last_of(log_dir, DOWN_LOG)}"
            return JobState.FAILED, "its cluster was torn down"
        launch = self._launches.get(cluster)
        if launch is not None:
            code = launch.poll()
            if code is None:
                progress = _last_of(log_dir, LAUNCH_LOG)
                return JobState.PENDING, "sky launch: provisioning" + (f" ({progress})" if progress else "")
            del self._launches[cluster]
            if code != 0:
                error = _last_of(log_dir, LAUNCH_ERR) or _last_of(log_dir, LAUNCH_LOG)
                return JobState.FAILED, f"sky launch failed (exit code {code}): {error}"
            self._seen.pop(cluster, None)
        try:
            status = await self._status(cluster)
        except SkyPilotError as exc:
            return job.state, f"could not read the cluster's state: {exc}"
        if status is None:
            return JobState.FAILED, f"SkyPilot knows no cluster {cluster} any more"
        if status.status == "UP":
            return JobState.LAUNCHING, None
        if status.status in ("INIT", "PENDING"):
            return JobState.PENDING, f"cluster {status.status}" + (
                f": {status.reason}" if status.reason else ""
            )
        return JobState.FAILED, f"cluster {cluster} is {status.status}" + (
            f": {status.reason}" if status.reason else ""
        )

    async def _status(self, cluster: str) -> ClusterStatus | None:
        seen = self._seen.get(cluster)
        if seen is not None and time.monotonic() - seen[0] < self._max_age_s:
            return seen[1]
        status = await self._sky.status(cluster)
        self._seen[cluster] = (time.monotonic(), status)
        return status

    def forget_status(self, cluster: str) -> None:
        """Read the cluster's state afresh next time (a user asked for this job)."""
        self._seen.pop(cluster, None)

    def shutdown(self, job: JobRecord) -> None:
        """Stop `sky launch` if it still runs, then `sky down -y CLUSTER`."""
        cluster = job.cluster or ""
        launch = self._launches.pop(cluster, None)
        if launch is not None and launch.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(launch.pid, signal.SIGTERM)
        self._seen.pop(cluster, None)
        self._downs[cluster] = self._sky.start(
            ["down", "-y", cluster], Path(job.log_dir), DOWN_LOG, DOWN_LOG, dict(os.environ)
        )


def _last_of(log_dir: Path, name: str) -> str:
    try:
        return last_line((log_dir / name).read_text(errors="replace"))
    except OSError:
        return ""
