"""Passive ejection: workers that keep failing leave this gateway's rotation for a while.

The proxy reports each attempt's verdict: `failed` for a connection refused, reset or timed
out, a 5xx answer, a stream that broke; `succeeded` for any other complete answer (a 4xx
is the worker working). After `after_failures` failures in a row a worker is *ejected*: no
request is routed to it for `cooldown_s`. Then it is *half-open*: it takes one request at a
time (only while this gateway has nothing else in flight to it); a success puts it back in
rotation and forgets its record, a failure ejects it again for twice as long, up to
`max_cooldown_s`. Verdicts from requests still under way when the worker was ejected do not
count until the cooldown ends: a draining worker finishing its old streams must not undo
its own ejection, and late failures must not lengthen it.

Ejection alone never turns a partial outage into a full one: when every worker a request
may still use is ejected, `in_rotation` returns them all and the routing policy picks one
as usual (Envoy's "panic threshold", here at 0 %). Every request still reaches a worker and
gets that worker's answer; a success then does not end the ejection early (it cannot be told
from an old request's), so such a fleet is back in normal rotation within one cooldown of
recovering.

This is what one gateway sees. Every worker is also checked actively elsewhere: vpool's
workers heartbeat to the controller (three missed and they leave the registry), and the
controller probes static endpoints' `/health`; the gateway adds no probes of its own.

The state is per worker id, held only for workers with a recent failure: with none, a
verdict costs one dict truth test and `Fleet.choose` does no extra work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from time import monotonic

from vpool.registry.records import WorkerRecord

log = logging.getLogger("vpool.gateway")

# Records kept before those of workers not ejected now (counting, or long recovered) are dropped.
_MAX_RECORDS = 256


class _Record:
    __slots__ = ("cooldown_s", "failures", "until")

    def __init__(self) -> None:
        self.failures = 0  # in a row, while in rotation
        self.until = 0.0  # monotonic end of the current ejection; 0: never ejected
        self.cooldown_s = 0.0


class Ejector:
    def __init__(
        self, after_failures: int = 3, cooldown_s: float = 10.0, max_cooldown_s: float = 60.0
    ) -> None:
        self.after_failures = after_failures  # 0: never eject
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max(max_cooldown_s, cooldown_s)
        self._records: dict[str, _Record] = {}

    def failed(self, worker_id: str) -> bool:
        """Count a failure; True when it ejects the worker (now, or again after a trial)."""
        if not self.after_failures:
            return False
        now = monotonic()
        record = self._records.get(worker_id)
        if record is None:
            if len(self._records) >= _MAX_RECORDS:
                self._forget_settled(now)
            record = self._records[worker_id] = _Record()
        if record.until:
            if now < record.until:
                return False  # already out: a request that began before the ejection
            # Half-open and failed again: out for longer.
            record.cooldown_s = min(record.cooldown_s * 2, self.max_cooldown_s)
            record.until = now + record.cooldown_s
            log.warning("worker %s failed its trial; ejected again for %.1f s", worker_id, record.cooldown_s)
            return True
        record.failures += 1
        if record.failures < self.after_failures:
            return False
        record.cooldown_s = self.cooldown_s
        record.until = now + record.cooldown_s
        log.warning(
            "worker %s ejected for %.1f s after %d failures in a row",
            worker_id, record.cooldown_s, record.failures,
        )  # fmt: skip
        return True

    def succeeded(self, worker_id: str) -> None:
        """The worker answered: its failure count starts over, or its trial passed."""
        records = self._records
        if not records:
            return  # the hot path: no worker has failed lately
        record = records.get(worker_id)
        if record is None:
            return
        if record.until:
            if monotonic() < record.until:
                return  # still cooling down: a request from before the ejection
            log.info("worker %s passed its trial; back in rotation", worker_id)
        del records[worker_id]

    @property
    def active(self) -> bool:
        """Whether any worker has a failure on record (else `in_rotation` has nothing to do)."""
        return bool(self._records)

    def in_rotation(self, candidates: list[WorkerRecord], inflight: Mapping[str, int]) -> list[WorkerRecord]:
        """The candidates not ejected; all of them when every one is (see the module doc)."""
        now = monotonic()
        records = self._records
        kept = []
        for worker in candidates:
            record = records.get(worker.worker_id)
            if record is None or not record.until:
                kept.append(worker)
            elif now >= record.until and not inflight.get(worker.worker_id, 0):
                kept.append(worker)  # half-open, and free for its one trial request
        return kept or candidates

    def ejected(self) -> list[str]:
        """Ids of the workers out of rotation now (cooling down), sorted."""
        now = monotonic()
        return sorted(w for w, r in self._records.items() if r.until > now)

    def _forget_settled(self, now: float) -> None:
        # Rare (hundreds of failing worker ids): a half-open worker forgotten here simply
        # rejoins the rotation.
        for worker_id in [w for w, r in self._records.items() if r.until <= now]:
            del self._records[worker_id]
