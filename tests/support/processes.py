"""Processes and ports shared by the tests that run vpool as real programs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A port free on 127.0.0.1 right now (nothing listens on it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_pids(pid: int, comm_contains: str) -> list[int]:
    """Direct children of `pid` whose process name contains `comm_contains` (Linux)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        kids = [int(k) for k in children.read().split()]
    return [k for k in kids if comm_contains in Path(f"/proc/{k}/comm").read_text()]


@dataclass
class Proc:
    """A program a test started, with its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """Ask with `sig`, then kill what is left after `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # A program started in a session of its own (a worker) may leave children behind:
        # vLLM's engine core outlives a SIGKILLed parent.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)


def wait_http(url: str, proc: Proc, timeout_s: float = 30) -> None:
    """Wait until `url` answers below 500; fail with `proc`'s log if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.log_tail()}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not answer {url}:\n{proc.log_tail()}")


def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    """Remove every key a test session wrote under `prefix:` (sessions share one Redis)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
