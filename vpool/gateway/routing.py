"""Which worker gets the next request: a small, replaceable policy.

A policy's `choose` runs on every request, so each is a single pass over the candidates
with no logging and nothing allocated but what the pick needs. A worker's load is its
*outstanding* count: this gateway's requests in flight to it plus the queue the worker
itself reports (0 for static endpoints, which report nothing).

`benchmarks/routing_quality.py` compares the three on a queueing model of an engine; the
"Routing quality" section of `benchmarks/README.md` has the figures behind the default,
least outstanding.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from vpool.registry.records import WorkerRecord


class RoutingPolicy(Protocol):
    def choose(self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int]) -> WorkerRecord:
        """Pick one of `candidates` (never empty)."""
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

    def choose(self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int]) -> WorkerRecord:
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

    def choose(self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int]) -> WorkerRecord:
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

    def choose(self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int]) -> WorkerRecord:
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


# Keys are the values `gateway.routing` accepts (`RoutingName` in vpool/config.py).
_POLICIES: dict[str, Callable[[], RoutingPolicy]] = {
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwoChoices,
    "round_robin": RoundRobin,
}


def make_policy(name: str) -> RoutingPolicy:
    """The policy called `name` in the configuration (`gateway.routing`)."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown routing policy `{name}`: expected one of {', '.join(sorted(_POLICIES))}"
        ) from None
    return factory()
