"""A one-node Ray cluster on this machine, started by the tests (CPU only).

`ray start --head --block` in a session of its own, on free ports, with a short temporary
directory of its own (Ray's Unix sockets live there and their paths must stay short).
`--block` keeps `ray start` in the foreground: SIGTERM to it stops the processes it
started, and what is left of its process group is killed after. Ready once its dashboard
answers the job API (`/api/version`). Ray's usage statistics are off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.processes import free_port

START_TIMEOUT_S = 90.0


@dataclass
class RayHead:
    gcs_address: str  # 127.0.0.1:PORT, what `ray.init(address=...)` and `ray start --address` take
    dashboard_url: str  # http://127.0.0.1:PORT, what the job API (`ray job submit --address`) takes
    temp_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@contextlib.contextmanager
def ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[RayHead]:
    """A Ray head whose processes (and so the jobs it runs) start with `env`."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vr-", dir="/tmp"))
    port, dashboard_port = free_port(), free_port()
    log_path = temp_dir / "ray-start.log"
    ray = str(Path(sys.executable).with_name("ray"))
    argv = [
        ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--num-cpus", str(num_cpus), "--num-gpus", "0", "--temp-dir", str(temp_dir),
        "--disable-usage-stats", "--include-dashboard", "true",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env={**env, "RAY_USAGE_STATS_ENABLED": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}", temp_dir, process, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ray start exited:\n{head.logs()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{head.dashboard_url}/api/version", timeout=2).is_success:
                    break
            assert time.monotonic() < deadline, f"Ray's dashboard did not answer:\n{head.logs()}"
            time.sleep(0.5)
        yield head
    finally:
        with contextlib.suppress(Exception):
            _stop_jobs(head)
        _stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_jobs(head: RayHead, timeout_s: float = 60.0) -> None:
    """Stop every job still running: Ray runs each entrypoint in a session of its own, so
    killing the head's process group would not reach it."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    live = [j.submission_id for j in client.list_jobs() if j.submission_id and not j.status.is_terminal()]
    for job_id in live:
        client.stop_job(job_id)
    deadline = time.monotonic() + timeout_s
    while live and time.monotonic() < deadline:
        live = [j for j in live if not client.get_job_status(j).is_terminal()]
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
    # Ray's daemons share the group of the `ray start` that started them.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.wait(10)
