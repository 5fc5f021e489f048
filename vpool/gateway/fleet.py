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
window (it died during the outage) leaves routing then. A restart quick enough that no call
failed is reported by the Redis registry as one failed listing (its run_id changed), so it
opens the same window.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Set

from vpool.errors import ModelNotFound, NoWorkerAvailable
from vpool.gateway.announce import Announcer
from vpool.gateway.ejection import Ejector
from vpool.gateway.prefix import PrefixKeying
from vpool.gateway.request_body import OpenAIRequest
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
        heartbeat_interval_s: float = 1.0,
        model_policies: Mapping[str, RoutingPolicy] | None = None,
    ) -> None:
        self._registry = registry
        self._policy = policy
        # Models routed by another policy than `policy` (`gateway.model_routing`).
        self._model_policies = dict(model_policies or {})
        # True when some policy wants a prefix key: else the request path never makes one.
        self.keyed = any(_keying(p) is not None for p in (policy, *self._model_policies.values()))
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
        # Per model: how many requests this gateway may run on its ready workers at once
        # (None: some worker does not say, so nothing is held back). See `capacity`.
        self._capacity: dict[str, int | None] = {}
        # This gateway's most requests on each worker between refreshes, for as long back as
        # a heartbeat may be old: what a heartbeat counted of ours may be more than we run now.
        self._peak: dict[str, int] = {}
        # Called after each refresh that reached the registry (the fair share lets requests out).
        self.after_refresh: Callable[[], None] | None = None
        # Keeps this gateway listed for discovery, from the refresh loop (see announce.py).
        self.announcer: Announcer | None = None
        self._peaks: deque[dict[str, int]] = deque(
            maxlen=math.ceil(2 * heartbeat_interval_s / refresh_interval_s) + 1
        )

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
        self._peaks.append(self._peak)
        self._peak = {w: n for w, n in self.inflight.items() if n}
        self._capacity = {name: self._room_on(workers) for name, workers in ready.items()}
        self.retained = list(retained.values())
        for worker_id in [w for w, n in self.inflight.items() if n == 0 and w not in live]:
            del self.inflight[worker_id]
        self.last_refresh = time.time()
        if self.after_refresh is not None:
            self.after_refresh()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()
            await self.announce()

    async def announce(self) -> None:
        """Renew this gateway's announcement when due; not while the registry is away (the
        refresh just waited out its timeout once)."""
        if self.announcer is not None and self.registry_ok:
            await self.announcer.tick()

    def routing_key(self, route: str, request: OpenAIRequest) -> int | None:
        """The request's prefix key if its model's policy wants one (see prefix.py)."""
        keying = _keying(self._policy_for(request.model))
        return keying.key(route, request.data) if keying is not None else None

    def _policy_for(self, model: str) -> RoutingPolicy:
        return self._model_policies.get(model, self._policy) if self._model_policies else self._policy

    def choose(self, model: str, exclude: Set[str] = frozenset(), key: int | None = None) -> WorkerRecord:
        """The worker for `model`; 404 for a model nobody serves, 503 when none is ready.

        Workers in `exclude` (those that already failed this request) are never chosen;
        ejected ones only when every other candidate is ejected too (see ejection.py).
        `key` is the request's prefix key (`routing_key`), for the policies that use one.
        """
        candidates = [w for w in self._ready.get(model, ()) if w.worker_id not in exclude]
        if not candidates:
            if model in self._known:
                raise NoWorkerAvailable(model)
            raise ModelNotFound(model)
        if self.ejector.active:
            candidates = self.ejector.in_rotation(candidates, self.inflight)
        policy = self._policy_for(model)
        if key is None:  # a policy of one's own may not take a key: give it none
            return policy.choose(candidates, self.inflight)
        return policy.choose(candidates, self.inflight, key)

    def capacity(self, model: str) -> int | None:
        """How many of this gateway's requests `model`'s ready workers can run at once: each
        one's `max_num_seqs`, less what other gateways run or queue there (its last heartbeat
        less this gateway's own requests on it). None (hold nothing back) when no worker is
        ready or one does not say its limit."""
        return self._capacity.get(model)

    def took(self, worker_id: str) -> None:
        """One more of this gateway's requests is on `worker_id`."""
        n = self.inflight[worker_id] + 1
        self.inflight[worker_id] = n
        if n > self._peak.get(worker_id, 0):
            self._peak[worker_id] = n

    def _room_on(self, workers: list[WorkerRecord]) -> int | None:
        room = 0
        for worker in workers:
            if worker.max_num_seqs is None:
                return None
            load = worker.load
            # Others' = the heartbeat's count less the most this gateway ran there lately: a
            # heartbeat is up to a second old, and counting ours as theirs would keep places
            # free for nobody. So other gateways' requests are, if anything, under-counted.
            ours = max(
                [self.inflight.get(worker.worker_id, 0), *(p.get(worker.worker_id, 0) for p in self._peaks)]
            )
            others = max(0, load.running + load.waiting - ours)
            room += max(0, worker.max_num_seqs - others)
        return room

    def ready_models(self) -> list[str]:
        return sorted(name for name, workers in self._ready.items() if workers)

    def ready_count(self, model: str) -> int:
        return len(self._ready.get(model, ()))

    def serves(self, model: str) -> bool:
        return bool(self._ready.get(model))

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


def _keying(policy: RoutingPolicy) -> PrefixKeying | None:
    """How `policy` wants requests keyed, if it does (routing.py's `keying` attribute)."""
    keying = getattr(policy, "keying", None)
    return keying if isinstance(keying, PrefixKeying) else None
