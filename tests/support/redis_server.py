"""A private `redis-server` a test can stop, freeze, resume and restart.

It listens on 127.0.0.1 and a port of its own, with no persistence (`--save '' --appendonly
no`), so `restart` brings back an empty server: a Redis without persistence after a crash.
`freeze` is SIGSTOP: the kernel still accepts connections on the port but nothing answers
them, the case where a client with no timeout hangs for ever. `running` always kills it at
the end, frozen or not.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import free_port

START_TIMEOUT_S = 10.0


class RedisServer:
    def __init__(self, workdir: Path, executable: str | None = None) -> None:
        found = executable or shutil.which("redis-server") or "/usr/bin/redis-server"
        self.executable = found
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / "redis.log"
        self.frozen = False
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start an empty server on this object's port and wait until it answers PING."""
        if self.is_running:
            raise RuntimeError("redis-server is already running")
        cmd = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.frozen = False
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill it as a crash would (SIGKILL): clients' connections drop, data is lost."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)  # SIGKILL works on a stopped process too
        process.wait(10)
        self.frozen = False

    def restart(self) -> None:
        """Stop and start again at once, empty, on the same port."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel and never answered."""
        self._signal(signal.SIGSTOP)
        self.frozen = True

    def resume(self) -> None:
        """SIGCONT: it answers again; keys whose TTL ran out meanwhile expire at once."""
        self._signal(signal.SIGCONT)
        self.frozen = False

    def ensure_serving(self) -> None:
        """Back to running and unfrozen, whatever a test left it as."""
        if self.frozen:
            self.resume()
        if not self.is_running:
            self.start()

    def ping(self, timeout_s: float = 0.2) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def _signal(self, sig: int) -> None:
        if self._process is None or self._process.poll() is not None:
            raise RuntimeError("redis-server is not running")
        os.kill(self._process.pid, sig)


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started private server, killed at the end of the block."""
    with tempfile.TemporaryDirectory(prefix="vpool-redis-") as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            yield server
        finally:
            server.stop()
