"""What each request used, counted once it ends: for billing, the limits and `/metrics`.

A `Charge` goes with every request that reached routing: its key, its limits grant, and the
usage its worker reported (vpool/gateway/usage_reading.py). When the request ends, the
charge settles the grant with the real tokens and adds the request to the `UsageMeter`,
which writes the counts per key, model and hour to the key store once a second (a batch,
not a write per request) and keeps them while the store is away.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vpool.gateway.fair_share import UNHELD, Turn
from vpool.gateway.fleet import Fleet
from vpool.gateway.limits import Grant, RateLimited, RateLimiter, is_limited, token_estimate
from vpool.gateway.metrics import GatewayMetrics
from vpool.gateway.request_body import OpenAIRequest, with_usage_asked
from vpool.gateway.usage_reading import StreamUsage, Usage, UsageAsked
from vpool.registry.keys import OPEN_KEY_ID, ApiKey, KeyStore, key_id_of
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.usage import Counts, UsageBatch, hour_of

log = logging.getLogger("vpool.gateway")

# Streams whose worker vpool asks for usage (stream_options), taking out what it adds.
USAGE_ASKED_ROUTES = frozenset({"chat", "completions"})
CLIENT_LEFT = 499


class UsageMeter:
    def __init__(self, store: KeyStore | None, metrics: GatewayMetrics, flush_s: float = 1.0) -> None:
        self._store = store
        self._metrics = metrics
        self._flush_s = flush_s
        self._pending = UsageBatch()
        self.store_ok = True

    def record(self, key: ApiKey | None, model: str, usage: Usage | None, status: int) -> None:
        prompt = usage.prompt_tokens if usage is not None else 0
        completion = usage.completion_tokens if usage is not None else 0
        # A client that left is no error of ours or the worker's.
        error = 1 if status >= 400 and status != CLIENT_LEFT else 0
        counts = Counts(1, prompt, completion, error)
        self._pending.add((hour_of(time.time()), key_id_of(key), model), counts)
        self._metrics.tokens(key.name if key else OPEN_KEY_ID, model, prompt, completion)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_s)
            await self.flush()

    async def flush(self) -> None:
        """Write what was counted since the last flush; on failure keep it for the next."""
        if self._store is None or not self._pending:
            return
        batch, self._pending = self._pending, UsageBatch()
        try:
            await self._store.add_usage(batch)
        except RegistryUnavailable as exc:
            batch.merge(self._pending)
            self._pending = batch
            if self.store_ok:
                log.warning("usage: the key store is unavailable, counting here until it is back: %s", exc)
            self.store_ok = False
            return
        if not self.store_ok:
            log.info("usage: the key store is available again")
        self.store_ok = True


class Charge:
    """One request's account, settled once when it ends: its limits grant, its usage and
    its fair-share turn on the model (vpool/gateway/fair_share.py) given back."""

    __slots__ = ("_limiter", "_meter", "grant", "key", "stream", "turn", "usage")

    def __init__(
        self,
        key: ApiKey | None,
        grant: Grant | None,
        limiter: RateLimiter,
        meter: UsageMeter,
        stream: StreamUsage | None = None,
    ) -> None:
        self.key = key
        self.grant = grant
        self.usage: Usage | None = None  # a whole answer's; a stream's is its reader's
        self.stream = stream
        self.turn: Turn = UNHELD
        self._limiter = limiter
        self._meter = meter

    def settle(self, model: str, status: int) -> None:
        self.turn.release()
        if self.usage is None and self.stream is not None:
            self.usage = self.stream.usage
        if self.grant is not None:
            used = self.usage.total if self.usage is not None else None
            if used is None and status >= 400 and status != CLIENT_LEFT:
                used = 0  # refused or failed: the estimate is given back
            self._limiter.settle(self.grant, used)
            self.grant = None
        self._meter.record(self.key, model, self.usage, status)


class Accounts:
    """Opens each request's charge: its limits admitted, its stream asked for usage."""

    def __init__(
        self, limiter: RateLimiter, meter: UsageMeter, fleet: Fleet, default_max_tokens: int
    ) -> None:
        self._fleet = fleet
        self.limiter = limiter
        self.meter = meter
        self._default_max_tokens = default_max_tokens

    async def open(
        self, key: ApiKey | None, request: OpenAIRequest, route: str
    ) -> tuple[OpenAIRequest, Charge]:
        """The request as it goes to the worker, and its charge; RateLimited if over a limit
        (counted as an error of the key's, under its model if a worker serves it)."""
        grant = None
        if is_limited(key):
            assert key is not None
            tokens = token_estimate(request.prompt_estimate(), request.max_tokens, self._default_max_tokens)
            try:
                grant = await self.limiter.admit(key, tokens)
            except RateLimited as exc:
                # Only a model some worker serves becomes a label: clients cannot grow the series.
                model = request.model if self._fleet.serves(request.model) else "-"
                self.meter.record(key, model, None, exc.status_code)
                raise
        stream = None
        if request.stream:
            if route in USAGE_ASKED_ROUTES:
                request = with_usage_asked(request)
                stream = StreamUsage(request.usage_asked, strip=True)
            else:  # responses: usage comes in its own events, nothing to take out
                stream = StreamUsage(UsageAsked.CONTINUOUS, strip=False)
        return request, Charge(key, grant, self.limiter, self.meter, stream)
