"""The in-memory registry: the embedded default, for one process with no Redis.

Each record is kept with an expiry on the monotonic clock (wall-clock jumps must not kill or
revive workers). Expired records are dropped the moment anything looks at them. No method
awaits while it reads or writes, so each one runs whole on the event loop and needs no lock.
Records go in and come out as copies: a caller that mutates what it got back must not change
what the registry holds.
"""

from __future__ import annotations

import time

from vpool.registry.records import GatewayRecord, JobRecord, WorkerLoad, WorkerRecord, WorkerState


class MemoryRegistry:
    """`Registry` over a dict of worker id → (record, monotonic expiry)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[WorkerRecord, float]] = {}
        self._jobs: dict[str, JobRecord] = {}
        self._gateways: dict[str, tuple[GatewayRecord, float]] = {}  # url → (record, expiry)

    async def put(self, record: WorkerRecord, ttl_s: float) -> None:
        """Insert or replace a record, alive for `ttl_s` seconds."""
        self._entries[record.worker_id] = (record.model_copy(deep=True), _expiry(ttl_s))

    async def heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> WorkerRecord | None:
        """Refresh load, `last_heartbeat` and TTL; None when the worker is unknown."""
        record = self._live(worker_id)
        if record is None:
            return None
        record.load = load.model_copy()
        record.last_heartbeat = time.time()
        self._entries[worker_id] = (record, _expiry(ttl_s))
        return record.model_copy(deep=True)

    async def set_state(self, worker_id: str, state: WorkerState, ttl_s: float) -> WorkerRecord | None:
        """Change a worker's state and TTL; None when the worker is unknown."""
        record = self._live(worker_id)
        if record is None:
            return None
        record.state = state
        self._entries[worker_id] = (record, _expiry(ttl_s))
        return record.model_copy(deep=True)

    async def get(self, worker_id: str) -> WorkerRecord | None:
        record = self._live(worker_id)
        return None if record is None else record.model_copy(deep=True)

    async def remove(self, worker_id: str) -> None:
        self._entries.pop(worker_id, None)

    async def list_workers(self) -> list[WorkerRecord]:
        """Every live record, in no particular order."""
        now = time.monotonic()
        expired = [wid for wid, (_, expires) in self._entries.items() if expires <= now]
        for worker_id in expired:
            del self._entries[worker_id]
        return [record.model_copy(deep=True) for record, _ in self._entries.values()]

    async def announce_gateway(self, url: str, ttl_s: float) -> None:
        self._gateways[url] = (GatewayRecord(url=url), _expiry(ttl_s))

    async def withdraw_gateway(self, url: str) -> None:
        self._gateways.pop(url, None)

    async def list_gateways(self) -> list[GatewayRecord]:
        now = time.monotonic()
        for url in [url for url, (_, expires) in self._gateways.items() if expires <= now]:
            del self._gateways[url]
        return [self._gateways[url][0].model_copy() for url in sorted(self._gateways)]

    async def put_job(self, job: JobRecord) -> None:
        self._jobs[job.job_id] = job.model_copy(deep=True)

    async def get_job(self, job_id: str) -> JobRecord | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.model_copy(deep=True)

    async def list_jobs(self) -> list[JobRecord]:
        jobs = sorted(self._jobs.values(), key=lambda j: (j.submitted_at, j.job_id))
        return [job.model_copy(deep=True) for job in jobs]

    async def remove_job(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    async def close(self) -> None:
        """Nothing to release; present because every backend has it."""

    def _live(self, worker_id: str) -> WorkerRecord | None:
        """The stored record (not a copy) if it has not expired; drops it if it has."""
        entry = self._entries.get(worker_id)
        if entry is None:
            return None
        record, expires = entry
        if expires <= time.monotonic():
            del self._entries[worker_id]
            return None
        return record


def _expiry(ttl_s: float) -> float:
    return time.monotonic() + ttl_s
