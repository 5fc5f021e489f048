"""The gateway's in-memory view of the fleet, refreshed in the background.

The request path never touches the registry: it reads this snapshot. When the registry
is unreachable the snapshot is kept as it was and the gateway reports itself degraded.

When the registry comes back it may list none of the workers: a Redis restarted without
persistence has lost every record, and one frozen longer than the workers' TTL expires them
all the moment it resumes. The workers register again on their next heartbeat, but a
refresh in between would empty the fleet at once. So for one expiry window (the workers'
TTL, plus one refresh) from the registry's return, a worker this gateway last saw READY and
the registry no longer lists is kept in routing: `retained`, and `/health` says degraded.
A worker that re-registers is the registry's again; one that has not by the end of the
window (it died during the outage) leaves routing then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Set

from vpool.errors import ModelNotFound, NoWorkerAvailable
from vpool.gateway.ejection import Ejector
from vpool.gateway.routing import RoutingPolicy
from vpool.registry.protocol import Registry, RegistryUnavailable
from vpool.registry.records import WorkerRecord, WorkerState

log = logging.getLogger("vpool.gateway")


class Fleet:
    def __init__(
        self,
        registry: Registry,
        policy: RoutingPolicy,
        catalog: set[str],
        refresh_interval_s: float,
        expiry_window_s: float = 0.0,
        ejector: Ejector | None = None,
    ) -> None:
        self._registry = registry
        self._policy = policy
        # Workers that keep failing this gateway's requests, out of rotation for a while.
        self.ejector = ejector or Ejector()
        self._catalog = set(catalog)
        self._interval = refresh_interval_s
        self._ready: dict[str, list[WorkerRecord]] = {}
        self._known: set[str] = set(catalog)
        self.records: list[WorkerRecord] = []
        # This gateway's own requests in flight, per worker id; survives refreshes.
        self.inflight: defaultdict[str, int] = defaultdict(int)
        self.registry_ok = True
        self.last_refresh = 0.0
        # READY workers the registry lost in an outage, kept in routing for a while (see above).
        self.retained: list[WorkerRecord] = []
        self._keep_lost_s = expiry_window_s + refresh_interval_s if expiry_window_s > 0 else 0.0
        self._keep_lost_until = 0.0  # monotonic

    async def refresh(self) -> None:
        try:
            records = await self._registry.list_workers()
        except RegistryUnavailable as exc:
            if self.registry_ok:
                log.warning("registry unavailable, serving from the last snapshot: %s", exc)
            self.registry_ok = False
            return
        now = time.monotonic()
        if not self.registry_ok:
            log.info("registry back")
            self.registry_ok = True
            self._keep_lost_until = now + self._keep_lost_s
        live = {r.worker_id for r in records}
        retained: dict[str, WorkerRecord] = {}
        if now < self._keep_lost_until:
            retained = {w.worker_id: w for ws in self._ready.values() for w in ws if w.worker_id not in live}
        if retained and not self.retained:
            log.warning(
                "registry back without %d workers; still routing to them for up to %.1f s while "
                "they register again", len(retained), self._keep_lost_until - now,
            )  # fmt: skip
        elif self.retained and not retained:
            if dropped := sorted(w.worker_id for w in self.retained if w.worker_id not in live):
                log.warning("out of routing, not registered again after the outage: %s", ", ".join(dropped))
        ready: dict[str, list[WorkerRecord]] = defaultdict(list)
        known = set(self._catalog)
        for record in [*records, *retained.values()]:
            known.update(record.models)
            if record.state == WorkerState.READY:
                for name in record.models:
                    ready[name].append(record)
        self.records, self._ready, self._known = records, dict(ready), known
        self.retained = list(retained.values())
        for worker_id in [w for w, n in self.inflight.items() if n == 0 and w not in live]:
            del self.inflight[worker_id]
        self.last_refresh = time.time()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    def choose(self, model: str, exclude: Set[str] = frozenset()) -> WorkerRecord:
        """The worker for `model`; 404 for a model nobody serves, 503 when none is ready.

        Workers in `exclude` (those that already failed this request) are never chosen;
        ejected ones only when every other candidate is ejected too (see ejection.py).
        """
        candidates = [w for w in self._ready.get(model, ()) if w.worker_id not in exclude]
        if not candidates:
            if model in self._known:
                raise NoWorkerAvailable(model)
            raise ModelNotFound(model)
        if self.ejector.active:
            candidates = self.ejector.in_rotation(candidates, self.inflight)
        return self._policy.choose(candidates, self.inflight)

    def ready_models(self) -> list[str]:
        return sorted(name for name, workers in self._ready.items() if workers)

    def ready_count(self, model: str) -> int:
        return len(self._ready.get(model, ()))

    def ready_for(self, model: str) -> list[WorkerRecord]:
        """The ready workers serving `model` (a copy)."""
        return list(self._ready.get(model, ()))

    def ready_generators(self) -> list[WorkerRecord]:
        """Every ready worker that generates text, each once."""
        seen: dict[str, WorkerRecord] = {}
        for workers in self._ready.values():
            for worker in workers:
                if worker.runner == "generate":
                    seen.setdefault(worker.worker_id, worker)
        return list(seen.values())

    def max_model_len(self, model: str) -> int | None:
        """The context every ready worker of `model` takes (the smallest they report)."""
        lengths = [w.max_model_len for w in self._ready.get(model, ()) if w.max_model_len]
        return min(lengths) if lengths else None
