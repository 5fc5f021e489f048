"""A fair share of a full model between keys.

vLLM serves its waiting requests first come, first served: one key that keeps 64 requests in
flight makes every other key's request wait behind all of them. So when this gateway already
runs as many requests on a model as its ready workers take at once (`Fleet.capacity`: their
`max_num_seqs`, less what other gateways run there), a new request waits here instead, in
its key's own queue. Each time one of the model's requests ends, the next one goes out in
turn across the keys that wait, weighted by `priority` (stride scheduling: a key of priority
2 gets two turns to another's one). A key that starts waiting joins at the current turn, so
time spent idle earns it no burst later.

One key that keeps a model full would still make another's request wait for one of its
requests to end (seconds, for long generations). So while other keys have asked for the
model lately (`share_window_s`), a key may not take the last `reserve` places: the next
request of another key starts at once. A key alone gets every place.

The queues are bounded per key (429) and in all (503), and a request waits at most
`max_wait_s` (503); all three answers carry Retry-After. A client that leaves while waiting
leaves its queue at once. Workers that do not say their `max_num_seqs` (external servers)
hold nothing back: requests go straight on, as without fair share.

The fast path, a model with room and nobody waiting, is two dict lookups and a few compares.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from starlette.types import Receive

from vpool.config import FairShareSettings
from vpool.errors import ServiceUnavailable, VpoolError
from vpool.gateway.fleet import Fleet
from vpool.registry.keys import OPEN_KEY_ID, ApiKey, key_id_of


class Turn:
    """One admitted request's place on its model; given back once, when the request ends."""

    __slots__ = ("_key_id", "_pool", "_share")

    def __init__(self, share: FairShare | None, pool: _Pool | None, key_id: str = OPEN_KEY_ID) -> None:
        self._share = share
        self._pool = pool
        self._key_id = key_id

    def release(self) -> None:
        if self._pool is not None and self._share is not None:
            pool, self._pool = self._pool, None
            pool.running -= 1
            pool.by_key[self._key_id] -= 1
            self._share.pump(pool)


# A request that holds no place: its model has no limit to keep, or fair share is off.
UNHELD = Turn(None, None)


@dataclass(eq=False, slots=True)
class _Waiter:
    key_id: str
    weight: int
    ready: asyncio.Future[Turn]


@dataclass(eq=False, slots=True)
class _Pool:
    """One model's requests: those running through this gateway and those waiting."""

    model: str
    running: int = 0
    waiting: int = 0
    by_key: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # running
    # When each key last asked for this model (monotonic): keys seen lately get their
    # reserved places (see `FairShare._room_for`).
    seen: dict[str, float] = field(default_factory=dict)
    queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    # Stride scheduling: each waiting key's pass; the lowest goes next, then moves on by
    # 1/priority. `now` is the pass of the last request let out.
    passes: dict[str, float] = field(default_factory=dict)
    now: float = 0.0


class QueueFull(VpoolError):
    """This key already has its most requests waiting for the model."""

    status_code = 429
    error_type = "requests"
    default_code = "queue_full"


class FleetFull(ServiceUnavailable):
    default_code = "queue_full"


class QueueTimeout(ServiceUnavailable):
    default_code = "queue_timeout"


class FairShare:
    """Per-model pools of running and waiting requests; see the module docstring."""

    def __init__(self, fleet: Fleet, settings: FairShareSettings) -> None:
        self._fleet = fleet
        self._settings = settings
        self._pools: dict[str, _Pool] = {}
        self.waiting = 0  # in all pools

    def take(self, model: str, key: ApiKey | None) -> Turn | None:
        """A turn now if `model` has room for `key` and nobody waits for it; None: `wait`."""
        if not self._settings.enabled:
            return UNHELD
        capacity = self._fleet.capacity(model)
        if capacity is None:
            return UNHELD
        pool = self._pools.get(model)
        if pool is None:
            pool = self._pools[model] = _Pool(model)
        key_id = key_id_of(key)
        pool.seen[key_id] = now = time.monotonic()
        if pool.waiting or not self._room_for(pool, key_id, capacity, now):
            return None
        return self._admit(pool, key_id)

    async def wait(self, model: str, key: ApiKey | None, receive: Receive) -> Turn | None:
        """Wait in `key`'s queue for a turn on `model`; None if the client left meanwhile.
        QueueFull, FleetFull or QueueTimeout when it cannot wait or waited too long."""
        pool = self._pools[model]  # made by `take`
        key_id = key_id_of(key)
        queue = pool.queues.get(key_id)
        settings = self._settings
        if queue is not None and len(queue) >= settings.max_queued_per_key:
            raise QueueFull(
                f"This key already has {len(queue)} requests waiting for `{model}`, the most it may; "
                "every worker serving it is busy. Retry later.",
                headers={"Retry-After": "1"},
            )
        if self.waiting >= settings.max_queued:
            raise FleetFull(
                f"Every worker serving `{model}` is busy and {self.waiting} requests are waiting "
                "on this gateway already. Retry later.",
                headers={"Retry-After": "1"},
            )
        weight = key.priority if key is not None else 1
        waiter = _Waiter(key_id, weight, asyncio.get_running_loop().create_future())
        if queue is None:
            queue = pool.queues[key_id] = deque()
            pool.passes[key_id] = max(pool.passes.get(key_id, 0.0), pool.now)
        queue.append(waiter)
        pool.waiting += 1
        self.waiting += 1
        self.pump(pool)  # room may have come since `take` (a refresh)
        started = time.monotonic()
        departed = asyncio.ensure_future(_departure(receive))
        try:
            await asyncio.wait(
                (waiter.ready, departed), timeout=settings.max_wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled: the gateway is stopping
            self._abandon(pool, waiter)
            raise
        finally:
            departed.cancel()
        left = _finished(departed)
        if not waiter.ready.done():
            self._abandon(pool, waiter)
            if left:
                return None
            raise QueueTimeout(
                f"Every worker serving `{model}` stayed busy: this request waited "
                f"{time.monotonic() - started:.0f} s for its turn, the most it may. Retry later.",
                headers={"Retry-After": "1"},
            )
        turn = waiter.ready.result()
        if left:
            turn.release()
            return None
        return turn

    def pump(self, pool: _Pool) -> None:
        """Let waiting requests out, in turn, while the model has room for their keys."""
        if not pool.waiting:
            return
        capacity = self._fleet.capacity(pool.model)
        now = time.monotonic()
        while pool.waiting:
            if capacity is None:
                eligible = list(pool.queues)
            else:
                eligible = [k for k in pool.queues if self._room_for(pool, k, capacity, now)]
            if not eligible:
                return
            key_id = min(eligible, key=pool.passes.__getitem__)
            queue = pool.queues[key_id]
            waiter = queue.popleft()
            pool.now = pool.passes[key_id]
            pool.passes[key_id] += 1.0 / waiter.weight
            if not queue:
                del pool.queues[key_id]
            pool.waiting -= 1
            self.waiting -= 1
            waiter.ready.set_result(self._admit(pool, key_id))

    def _room_for(self, pool: _Pool, key_id: str, capacity: int, now: float) -> bool:
        """Whether `key_id` may have one more request running on the model. The model must
        have room, and a key may not take the last `reserve` places while another key has
        asked for the model lately: those are kept, so that the other's next request starts
        at once instead of waiting for one of this key's to end. A key alone gets them all,
        and every key always gets at least one place."""
        if pool.running >= capacity:
            return False
        reserve = self._settings.reserve
        if not reserve or pool.by_key[key_id] < max(1, capacity - reserve):
            return True
        lately = now - self._settings.share_window_s
        return not any(seen > lately for other, seen in pool.seen.items() if other != key_id)

    def _admit(self, pool: _Pool, key_id: str) -> Turn:
        pool.running += 1
        pool.by_key[key_id] += 1
        return Turn(self, pool, key_id)

    def pump_all(self) -> None:
        """After each fleet refresh (`Fleet.after_refresh`): a worker may have joined or
        freed room; keys not seen lately give up their reserve."""
        lately = time.monotonic() - self._settings.share_window_s
        for pool in self._pools.values():
            for key_id in [k for k, seen in pool.seen.items() if seen <= lately]:
                del pool.seen[key_id]
                if not pool.by_key.get(key_id, 1):
                    del pool.by_key[key_id]
            self.pump(pool)

    def waiting_per_model(self) -> dict[str, int]:
        return {pool.model: pool.waiting for pool in self._pools.values() if pool.waiting}

    def _abandon(self, pool: _Pool, waiter: _Waiter) -> None:
        """A waiter that will not run: out of its queue, or its turn given back."""
        if waiter.ready.done():
            if not waiter.ready.cancelled():
                waiter.ready.result().release()
            return
        waiter.ready.cancel()
        queue = pool.queues.get(waiter.key_id)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del pool.queues[waiter.key_id]
        pool.waiting -= 1
        self.waiting -= 1


def _finished(task: asyncio.Future[None]) -> bool:
    """Whether `task` ran to its end (an error in `receive` counts: the client is gone)."""
    if not task.done() or task.cancelled():
        return False
    task.exception()  # retrieved, so asyncio does not warn of it
    return True


async def _departure(receive: Receive) -> None:
    """Return once the client has gone (its body is read: what comes now is the end)."""
    while (await receive())["type"] != "http.disconnect":
        pass
