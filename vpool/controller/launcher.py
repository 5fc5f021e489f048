"""Start and supervise worker processes on this machine (the local launcher).

Each replica of each catalog model is one child process (`python -m vpool.worker`) that
registers itself with the controller. A process that dies after it was ready is started
again; one that dies while loading is FAILED, with its log kept for the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vpool.config import ModelSpec
from vpool.registry.protocol import Registry, RegistryUnavailable
from vpool.registry.records import WorkerState

log = logging.getLogger("vpool.launcher")

RESTART_BACKOFF_S = 5.0


@dataclass
class LaunchedWorker:
    worker_id: str
    spec: ModelSpec
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    state: WorkerState = WorkerState.LAUNCHING
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0

    def last_log_line(self) -> str:
        """The newest line of the worker's log: the progress shown while it loads."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalLauncher:
    def __init__(
        self,
        specs: list[ModelSpec],
        controller_url: str,
        registry: Registry,
        cache_dir: Path,
        registration_token: str | None = None,
    ) -> None:
        self._controller_url = controller_url
        self._registry = registry
        self._cache_dir = cache_dir
        self._token = registration_token
        self._stopping = False
        log_dir = cache_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.workers = [
            LaunchedWorker(f"{_slug(spec.name)}-{i}", spec, log_dir / f"{_slug(spec.name)}-{i}.log")
            for spec in specs
            for i in range(spec.replicas)
        ]

    def start_all(self) -> None:
        for worker in self.workers:
            self._start(worker)

    def _start(self, worker: LaunchedWorker) -> None:
        env = dict(os.environ)
        if self._token:
            env["VPOOL_REGISTRATION_TOKEN"] = self._token
        cmd = [
            sys.executable, "-m", "vpool.worker",
            "--spec-json", worker.spec.model_dump_json(),
            "--controller", self._controller_url,
            "--worker-id", worker.worker_id,
            "--cache-dir", str(self._cache_dir),
        ]  # fmt: skip
        log_file = worker.log_path.open("ab")
        worker.process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log_file.close()
        worker.state = WorkerState.LAUNCHING
        worker.started_at = time.monotonic()

    async def poll(self) -> None:
        """Update each worker's state from its process and the registry."""
        try:
            ready = {r.worker_id for r in await self._registry.list_workers() if r.state == WorkerState.READY}
        except RegistryUnavailable:
            ready = set()
        for worker in self.workers:
            code = worker.process.poll() if worker.process else None
            if code is not None and not self._stopping:
                _kill_group(worker.process)
                if worker.state == WorkerState.READY:
                    log.warning("worker %s exited (code %s); restarting", worker.worker_id, code)
                    worker.restarts += 1
                    await asyncio.sleep(RESTART_BACKOFF_S)
                    self._start(worker)
                elif worker.state != WorkerState.FAILED:
                    worker.state = WorkerState.FAILED
            elif worker.worker_id in ready:
                worker.state = WorkerState.READY

    async def supervise(self, interval_s: float = 1.0) -> None:
        while not self._stopping:
            await self.poll()
            await asyncio.sleep(interval_s)

    async def stop_all(self, timeout_s: float = 30.0) -> None:
        """SIGTERM every worker (they drain and deregister), then SIGKILL stragglers."""
        self._stopping = True
        running = [w.process for w in self.workers if w.process and w.process.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for proc in running:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL a worker's whole process group: a worker killed outright leaves vLLM's engine
    core process behind (it does not notice its parent died), holding memory and devices."""
    if proc is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "model"
