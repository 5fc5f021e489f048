"""Which worker gets the next request: a small, replaceable policy.

A policy's `choose` runs on every request, so each is a single pass over the candidates
with no logging and nothing allocated but what the pick needs. A worker's load is its
*outstanding* count: this gateway's requests in flight to it plus the queue the worker
itself reports (0 for static endpoints, which report nothing).

`benchmarks/routing_quality.py` compares the three load-only policies on a queueing model of
an engine; the "Routing quality" section of `benchmarks/README.md` has the figures behind the
default, least outstanding. The fourth, `prefix`, also goes by what the request's prompt
starts with (vpool/gateway/prefix.py), so that a worker's prefix cache gets reused.

A policy that wants the request's prefix key says so with a `keying` attribute (how to make
the key); the fleet then computes the key and passes it to `choose`. The others are never
given one and the request path computes nothing for them.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from vpool.config import PrefixRoutingSettings, Settings
from vpool.gateway.prefix import PrefixKeying
from vpool.registry.records import WorkerRecord


class RoutingPolicy(Protocol):
    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int], key: int | None = None
    ) -> WorkerRecord:
        """Pick one of `candidates` (never empty). `key`, the request's prefix key, is only
        ever given to a policy with a `keying` attribute, and only when the request has one."""
        ...


def outstanding(worker: WorkerRecord, inflight: Mapping[str, int]) -> int:
    """Requests the worker has yet to finish, as far as this gateway can tell."""
    return inflight.get(worker.worker_id, 0) + worker.load.waiting


class LeastOutstanding:
    """Fewest outstanding requests over all candidates: the default.

    Ties are broken at random so that idle replicas share the traffic. With one gateway the
    in-flight counts are exact, so this is join-the-shortest-queue, which measured best.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int], key: int | None = None
    ) -> WorkerRecord:
        best, best_score, ties = candidates[0], math.inf, 0
        for worker in candidates:
            score = inflight.get(worker.worker_id, 0) + worker.load.waiting
            if score < best_score:
                best, best_score, ties = worker, score, 1
            elif score == best_score:
                # Reservoir sampling: each of the k tied workers ends up chosen with
                # probability 1/k, without collecting them in a list.
                ties += 1
                if self._random() * ties < 1:
                    best = worker
        return best


class PowerOfTwoChoices:
    """The less loaded of two distinct candidates drawn at random.

    With exact load figures (one gateway) it measured a little behind `LeastOutstanding`.
    It is meant for figures that are not exact: several gateways each see only their own
    in-flight requests plus worker queues up to a heartbeat old, and scanning for the
    minimum can send all of them to the same "least loaded" worker until the next
    refresh, while two random draws spread them (Mitzenmacher, "How useful is old
    information?", 2000). With two candidates it is the same as `LeastOutstanding`.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = (rng or random.Random()).random

    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int], key: int | None = None
    ) -> WorkerRecord:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = int(self._random() * n)
        j = int(self._random() * (n - 1))
        if j >= i:
            j += 1  # a second draw from the other n - 1: the two are always distinct
        first, second = candidates[i], candidates[j]
        # `first` is itself a uniform draw, so keeping it on a tie is a fair coin.
        return second if outstanding(second, inflight) < outstanding(first, inflight) else first


class RoundRobin:
    """Each candidate in turn, ignoring load: the baseline the others must beat.

    The policy is not told the model, and candidate lists change under it (workers come
    and go between fleet refreshes; a retry excludes the worker that failed), so instead
    of an index into a list it remembers when it last chose each worker and picks the
    candidate chosen longest ago (never chosen counts as longest). Over a model's replicas
    that is an exact cycle; a new worker gets the next request; a departed one leaves no gap
    in the turn order. A worker serving several models takes its turns across all of them.
    """

    # Stamps for workers that no longer exist are dropped once there are this many.
    _MAX_REMEMBERED = 4096

    def __init__(self) -> None:
        self._last_chosen: dict[str, int] = {}
        self._clock = 0

    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int], key: int | None = None
    ) -> WorkerRecord:
        last_chosen = self._last_chosen
        best, best_stamp = candidates[0], math.inf
        for worker in candidates:
            stamp = last_chosen.get(worker.worker_id, -1)
            if stamp < best_stamp:
                best, best_stamp = worker, stamp
        self._clock += 1
        if len(last_chosen) >= self._MAX_REMEMBERED and best.worker_id not in last_chosen:
            last_chosen.clear()  # rare: thousands of worker ids seen; restarts the cycle
        last_chosen[best.worker_id] = self._clock
        return best


class PrefixAffinity:
    """Requests with the same prefix key to the same worker, unless it is loaded past a bound.

    Rendezvous (highest random weight) hashing: each candidate's weight is a hash of the key
    and its worker id, and the highest wins. It needs no table and no shared state, so every
    gateway replica picks the same worker for a key; a worker that leaves moves only the
    keys it won (each to its runner-up), one that joins takes only the keys it now wins,
    about 1/n of them.

    Bounded load (Mirrokni, Thorup and Zadimoghaddam, "Consistent hashing with bounded
    loads", 2018): the candidates are walked in weight order and the first whose outstanding
    count is below ceil((1 + ε) * (total + 1) / n) takes the request, so a hot prefix
    spills to its next choices rather than piling onto one worker, and no worker holds more
    than 1 + ε times the mean. Some candidate is always below that bound (the least loaded
    is at most the mean), so the walk always ends; the spill goes in weight order, which
    keeps a hot prefix on few workers, all replicas agreeing. A request with no key (an
    embedding, a prompt under one block) goes to the least outstanding worker.
    """

    # Worker ids' hashes are remembered; dropped once there are this many (ids seen so far).
    _MAX_REMEMBERED = 4096

    def __init__(self, keying: PrefixKeying, epsilon: float, rng: random.Random | None = None) -> None:
        self.keying = keying
        self.epsilon = epsilon
        self._least = LeastOutstanding(rng)
        self._id_hashes: dict[str, int] = {}

    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int], key: int | None = None
    ) -> WorkerRecord:
        if key is None or len(candidates) == 1:
            return self._least.choose(candidates, inflight)
        high = (key & 0xFFFFFFFF) << 32
        id_hashes = self._id_hashes
        total = 0
        best, best_weight, best_load = candidates[0], -1, 0
        for worker in candidates:
            worker_id = worker.worker_id
            low = id_hashes.get(worker_id)
            if low is None:
                low = self._remember(worker_id)
            weight = _mix64(high | low)  # = rendezvous_weight(key, worker_id)
            load = inflight.get(worker_id, 0) + worker.load.waiting
            total += load
            if weight > best_weight:
                best, best_weight, best_load = worker, weight, load
        cap = math.ceil((1 + self.epsilon) * (total + 1) / len(candidates))
        if best_load < cap:
            return best  # the usual case: the key's own worker has room
        # Spilling: the rest in weight order (a second pass, only now).
        ranked = sorted(candidates, key=lambda w: rendezvous_weight(key, w.worker_id), reverse=True)
        for worker in ranked:
            if inflight.get(worker.worker_id, 0) + worker.load.waiting < cap:
                return worker
        return self._least.choose(candidates, inflight)  # unreachable by the arithmetic above

    def _remember(self, worker_id: str) -> int:
        if len(self._id_hashes) >= self._MAX_REMEMBERED:
            self._id_hashes.clear()  # rare: thousands of worker ids seen
        low = self._id_hashes[worker_id] = zlib.crc32(worker_id.encode())
        return low


_MASK_64 = (1 << 64) - 1


def rendezvous_weight(key: int, worker_id: str) -> int:
    """The worker's weight for `key`: the same in every process (no salted `hash()`).

    The 32-bit key and the CRC-32 of the worker id side by side, through SplitMix64's
    finalizer (a bijection on 64 bits that spreads every input bit over the output).
    """
    return _mix64((key & 0xFFFFFFFF) << 32 | zlib.crc32(worker_id.encode()))


def _mix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


def _prefix_policy(settings: PrefixRoutingSettings | None) -> RoutingPolicy:
    settings = settings or PrefixRoutingSettings()
    keying = PrefixKeying(settings.block_chars, settings.prefix_blocks, settings.by_conversation)
    return PrefixAffinity(keying, settings.epsilon)


# Keys are the values `gateway.routing` accepts (`RoutingName` in vpool/config.py).
_POLICIES: dict[str, Callable[[PrefixRoutingSettings | None], RoutingPolicy]] = {
    "least_outstanding": lambda _: LeastOutstanding(),
    "power_of_two": lambda _: PowerOfTwoChoices(),
    "prefix": _prefix_policy,
    "round_robin": lambda _: RoundRobin(),
}


def make_policy(name: str, prefix: PrefixRoutingSettings | None = None) -> RoutingPolicy:
    """The policy called `name` in the configuration (`gateway.routing`); `prefix` is how
    the `prefix` policy cuts and bounds (`gateway.prefix_routing`; its defaults if None)."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy `{name}`: expected one of {', '.join(sorted(_POLICIES))}"
        ) from None
    return factory(prefix)


def model_policies(settings: Settings) -> dict[str, RoutingPolicy]:
    """The policy of each model name `gateway.model_routing` overrides.

    As with `gateway.model_timeouts`, an override keyed by a catalog model's name (or one
    of its aliases) applies to every name it is served under, all sharing one policy.
    """
    g = settings.gateway
    served_as = {name: spec.served_names for spec in settings.models for name in spec.served_names}
    by_model: dict[str, RoutingPolicy] = {}
    for key, name in g.model_routing.items():
        policy = make_policy(name, g.prefix_routing)
        for served in served_as.get(key, [key]):
            by_model[served] = policy
    return by_model
