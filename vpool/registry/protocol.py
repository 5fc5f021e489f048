"""The registry interface: where workers and their load live.

Two backends implement it: `MemoryRegistry` (the embedded default, one process) and
`RedisRegistry` (shared by several gateways and a controller). Liveness is a TTL owned by
the backend: a record whose TTL runs out without a heartbeat simply disappears, so a dead
worker leaves routing with nobody having to notice it died.

Every method returns or raises `RegistryUnavailable` within the backend's timeout: callers
(a heartbeat, the gateway's refresh) may rely on that and never add timeouts of their own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from vpool.config import RegistrySettings
from vpool.registry.records import GatewayRecord, JobRecord, WorkerLoad, WorkerRecord, WorkerState

log = logging.getLogger("vpool.registry")
T = TypeVar("T")


class RegistryUnavailable(Exception):
    """The backing store did not answer in time (Redis down, frozen or unreachable)."""


class RegistryHealth:
    """How a process's registry calls have been going, for `/health` and the logs.

    Calls report their outcome through `track`, so reading the status costs no registry call
    and a frozen Redis cannot make `/health` hang. One warning when the registry goes away,
    one line when it returns: a heartbeat per worker per second must not log each failure.
    """

    def __init__(self) -> None:
        self.ok = True
        self.failures = 0  # calls that failed, ever
        self.last_error = ""
        self._down_since = 0.0

    async def track(self, call: Awaitable[T]) -> T:
        try:
            result = await call
        except RegistryUnavailable as exc:
            self.failed(exc)
            raise
        self.succeeded()
        return result

    def failed(self, exc: RegistryUnavailable) -> None:
        self.failures += 1
        self.last_error = str(exc)
        if self.ok:
            self.ok = False
            self._down_since = time.monotonic()
            log.warning("registry unavailable: %s", exc)

    def succeeded(self) -> None:
        if not self.ok:
            self.ok = True
            log.info("registry back after %.1f s", time.monotonic() - self._down_since)


class Registry(Protocol):
    async def put(self, record: WorkerRecord, ttl_s: float) -> None:
        """Insert or replace a record, alive for `ttl_s` seconds."""
        ...

    async def heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> WorkerRecord | None:
        """Refresh load, `last_heartbeat` and TTL; None when the worker is unknown."""
        ...

    async def set_state(self, worker_id: str, state: WorkerState, ttl_s: float) -> WorkerRecord | None:
        """Change a worker's state and TTL; None when the worker is unknown."""
        ...

    async def get(self, worker_id: str) -> WorkerRecord | None: ...

    async def remove(self, worker_id: str) -> None: ...

    async def list_workers(self) -> list[WorkerRecord]:
        """Every live record, in no particular order."""
        ...

    # Gateways: announced for discovery only (routing never reads them), alive for a TTL.

    async def announce_gateway(self, url: str, ttl_s: float) -> None:
        """Say the gateway at `url` is serving, for `ttl_s` seconds from now."""
        ...

    async def withdraw_gateway(self, url: str) -> None:
        """The gateway at `url` is stopping: forget it now, not when its TTL runs out."""
        ...

    async def list_gateways(self) -> list[GatewayRecord]:
        """Every gateway whose announcement is still alive, ordered by URL."""
        ...

    # Jobs: durable records of launches, kept until removed (no TTL).

    async def put_job(self, job: JobRecord) -> None:
        """Insert or replace a job record."""
        ...

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def list_jobs(self) -> list[JobRecord]:
        """Every job record, oldest submitted first."""
        ...

    async def remove_job(self, job_id: str) -> None: ...

    async def close(self) -> None: ...


def open_registry(settings: RegistrySettings) -> Registry:
    """Build the backend the URL names: memory:// or redis://."""
    if settings.url.startswith("memory://"):
        from vpool.registry.memory_backend import MemoryRegistry

        return MemoryRegistry()
    from vpool.registry.redis_backend import RedisRegistry

    return RedisRegistry.from_url(settings.url, key_prefix=settings.key_prefix, timeout_s=settings.timeout_s)
