"""vpool in split mode as real processes: a controller and a gateway over the local Redis,
fronting one OpenAI-compatible endpoint (a stub). For tests of process-level behaviour:
several gateway processes on one port, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.stub_worker import closed_port

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class SplitFleet:
    url: str
    port: int
    controller: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    log_dir: Path

    def gateway_log(self) -> str:
        return (self.log_dir / "gateway.log").read_text(errors="replace")


def listeners(port: int) -> list[str]:
    """`ss` lines of the sockets listening on `port`, one per process."""
    result = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    return result.stdout.strip().splitlines()


def _vpool(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "vpool.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its gateway processes can be killed with it, as a group
        )


@contextlib.contextmanager
def split_fleet(
    endpoint_url: str, model: str, log_dir: Path, processes: int = 1, timeout_s: float = 30
) -> Iterator[SplitFleet]:
    """Start controller and gateway; yield once every gateway process listens and routes `model`."""
    port, controller_port = closed_port(), closed_port()
    config = log_dir / "vpool.yaml"
    config.write_text(
        f"gateway: {{port: {port}, processes: {processes}}}\n"
        f"controller: {{port: {controller_port}}}\n"
        f"registry: {{url: '{REDIS_URL}', key_prefix: 'test-{uuid.uuid4().hex[:8]}'}}\n"
        f"endpoints: [{{url: '{endpoint_url}', models: [{model}]}}]\n"
    )
    controller = _vpool(["controller", "--config", str(config)], log_dir / "controller.log")
    gateway = _vpool(["gateway", "--config", str(config)], log_dir / "gateway.log")
    fleet = SplitFleet(f"http://127.0.0.1:{port}", port, controller, gateway, log_dir)
    try:
        deadline = time.monotonic() + timeout_s
        routed_in_a_row = 0
        # Each new connection may land on any gateway process, and each refreshes its own
        # fleet view: wait until several in a row (new connections each) route the model.
        while routed_in_a_row < 4 * processes:
            assert gateway.poll() is None, fleet.gateway_log()
            found = listeners(port)
            try:
                routed = httpx.get(fleet.url + "/v1/models", timeout=1).json()["data"]
            except httpx.HTTPError:
                routed = []
            routed_in_a_row = routed_in_a_row + 1 if routed and len(found) == processes else 0
            assert time.monotonic() < deadline, f"gateway not serving `{model}`: {found}"
            time.sleep(0.05)
        yield fleet
    finally:
        for proc in (gateway, controller):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of it, children included
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
