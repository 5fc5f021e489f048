"""Per-key limits (requests and tokens per minute, requests at once), the same on every gateway.

On a request's path: one Redis script (EVALSHA) reads and charges the key's counters
atomically, on Redis's clock, so gateways on other clocks agree. One call serves every
request that arrived in the same turn of the event loop, and frees the leases of those that
ended: a call per request cost 0.27x the gateway's throughput at 32 connections
(benchmarks/tenancy.py), redis-py's asyncio client spending ~100 us of CPU per call.

The minute is a sliding window, counted as OpenAI-style fixed minutes weighted together
(this minute's count plus the last minute's, scaled by how much of it is still inside the
window): no burst of twice the limit across a minute's edge, two counters per key and kind.
Tokens are charged up front (prompt size and `max_tokens`) and settled with the worker's own
count afterwards; requests at once are leases in a sorted set that expire unless renewed, so
a gateway that dies holding some frees them within `LEASE_S`. Token corrections, renewing
and this gateway's heartbeat are batched off the path, about once a second.

Redis away (or slower than `timeout_s`): each gateway goes on enforcing with counters of its
own, each limit divided by the gateways it last saw alive, and says so in `/health`; the next
heartbeat that gets through switches back. Nothing waits on a Redis that does not answer
beyond `timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from vpool.errors import VpoolError
from vpool.registry.keys import ApiKey

log = logging.getLogger("vpool.gateway")

WINDOW_MS = 60_000
LEASE_S = 60.0  # a request at once is held this long unless its gateway renews it
HEARTBEAT_S = 1.0
ALIVE_S = 5.0  # gateways seen within this count towards the local shares

# One call admits every request that arrived in one turn of the event loop, after freeing
# the leases of requests that ended. KEYS: the keys' bases, each once. ARGV: the admits, the
# releases, the lease time, then one string per admit, "base index,rpm,tpm,parallel,cost,
# lease", and one per release, "base index,lease": one argument each, as redis-py packs
# every argument in Python (five an admit were a tenth of the gateway's time). Returns
# Redis's time (ms), then per admit one string, "denied,rc,rp,tc,tp,parallel"
# (`_Reply.parse`): one bulk string each parses far faster than a nested array of seven.
_ADMIT = """
local admits, releases, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, releases do
  local k, lease = string.match(ARGV[3 + admits + i], '^(%d+),(.*)$')
  redis.call('ZREM', KEYS[tonumber(k)] .. ':p', lease)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minute = math.floor(now / 60000)
local weight = 1 - (now % 60000) / 60000
local function counts(base, kind)
  local cur = tonumber(redis.call('GET', base .. ':' .. kind .. ':' .. minute) or '0')
  local prev = tonumber(redis.call('GET', base .. ':' .. kind .. ':' .. (minute - 1)) or '0')
  return math.max(cur, 0), math.max(prev, 0)
end
local replies = {now}
for i = 1, admits do
  local k, rpm, tpm, par, cost, lease = string.match(ARGV[3 + i], '^(%d+),(%d+),(%d+),(%d+),(%d+),(.*)$')
  local base = KEYS[tonumber(k)]
  rpm, tpm, par, cost = tonumber(rpm), tonumber(tpm), tonumber(par), tonumber(cost)
  local rc, rp, tc, tp, pu = 0, 0, 0, 0, 0
  if rpm > 0 then rc, rp = counts(base, 'r') end
  if tpm > 0 then tc, tp = counts(base, 't') end
  if par > 0 then
    redis.call('ZREMRANGEBYSCORE', base .. ':p', '-inf', now)
    pu = redis.call('ZCARD', base .. ':p')
  end
  local denied = ''
  if rpm > 0 and rc + rp * weight + 1 > rpm then denied = 'requests'
  elseif tpm > 0 and tc + tp * weight + cost > tpm then denied = 'tokens'
  elseif par > 0 and pu >= par then denied = 'parallel' end
  if denied == '' then
    if rpm > 0 then
      rc = redis.call('INCR', base .. ':r:' .. minute)
      redis.call('PEXPIRE', base .. ':r:' .. minute, 130000)
    end
    if tpm > 0 then
      tc = redis.call('INCRBY', base .. ':t:' .. minute, cost)
      redis.call('PEXPIRE', base .. ':t:' .. minute, 130000)
    end
    if par > 0 then
      redis.call('ZADD', base .. ':p', now + lease_ms, lease)
      redis.call('PEXPIRE', base .. ':p', lease_ms * 2)
      pu = pu + 1
    end
  end
  replies[i + 1] = table.concat({denied, rc, rp, tc, tp, pu}, ',')
end
return replies
"""

# KEYS: the gateways' set, then one lease set per lease; ARGV: this gateway, the lease time,
# then the leases. Renews every lease this gateway holds and says how many gateways live.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease_ms, ARGV[i + 2])
end
return redis.call('ZCARD', KEYS[1])
"""


class RateLimited(VpoolError):
    """Over a key's limit: 429 as OpenAI answers it (`type` says which limit)."""

    status_code = 429
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.error_type = kind  # type: ignore[misc]  # OpenAI: "requests" or "tokens"


@dataclass(frozen=True, slots=True)
class Window:
    """One limit's sliding minute as last read: this minute's count, the last one's, and
    how far into this minute it is."""

    limit: int
    current: float
    previous: float
    into: float  # 0..1

    @property
    def used(self) -> float:
        return self.current + self.previous * (1 - self.into)

    @property
    def remaining(self) -> int:
        return max(0, math.floor(self.limit - self.used))

    def reset_s(self) -> float:
        """Until nothing counts any more (OpenAI's `x-ratelimit-reset-*`)."""
        left = (1 - self.into) * WINDOW_MS / 1000
        return left + WINDOW_MS / 1000 if self.current > 0 else (left if self.previous > 0 else 0.0)

    def fits_after_s(self, cost: float) -> float:
        """Until `cost` more would fit, with no other traffic."""
        room = self.limit - cost - self.current
        if room >= 0 and self.previous > 0:
            needed = 1 - room / self.previous
            if needed <= 1:
                return max(0.0, needed - self.into) * WINDOW_MS / 1000
        if room >= 0:
            return 0.0
        # Not in this minute: in the next, this minute's count becomes the decaying one.
        needed = 1 - (self.limit - cost) / self.current if self.current > 0 else 0.0
        return ((1 - self.into) + max(0.0, needed)) * WINDOW_MS / 1000


@dataclass(slots=True)
class Grant:
    """What admitting one request charged, to settle when it ends."""

    key: ApiKey
    charged_tokens: int
    minute: int
    lease: str | None
    local: bool
    headers: list[tuple[bytes, bytes]]


def is_limited(key: ApiKey | None) -> bool:
    return key is not None and bool(key.rpm or key.tpm or key.max_parallel)


def token_estimate(prompt_tokens: int, max_tokens: int | None, default_max_tokens: int) -> int:
    return prompt_tokens + (default_max_tokens if max_tokens is None else max_tokens)


class RateLimiter:
    def __init__(
        self,
        client: Redis | None,
        key_prefix: str,
        timeout_s: float = 0.25,
        gateway_id: str | None = None,
        lease_s: float = LEASE_S,
    ) -> None:
        self._client = client
        self._lease_ms = int(lease_s * 1000)
        self._prefix = key_prefix
        self._timeout_s = timeout_s
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self._admit = client.register_script(_ADMIT) if client is not None else None
        self._heartbeat = client.register_script(_HEARTBEAT) if client is not None else None
        # Redis answered the last call; with no Redis at all, local counters are the rule.
        self.shared = client is not None
        self.gateways_alive = 1
        self._local = _LocalCounters()
        self._leases: dict[str, str] = {}  # lease -> its key's base, renewed every heartbeat
        # Token corrections not yet written, summed per key and minute: one INCRBY each a
        # beat, not one per request (36,000 pipelined commands a second were most of the
        # gateway's Redis time at 32 connections).
        self._settles: defaultdict[tuple[str, int], int] = defaultdict(int)
        # The next script call: admits waiting for their reply, leases to free.
        self._admits: list[tuple[ApiKey, int, str, asyncio.Future[_Reply]]] = []
        self._releases: list[tuple[str, str]] = []  # base, lease
        self._batch_due = False
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def mode(self) -> str:
        """For `/health`: `shared` (Redis), `local` (no Redis configured) or `degraded`."""
        if self._client is None:
            return "local"
        return "shared" if self.shared else "degraded"

    async def admit(self, key: ApiKey, tokens: int) -> Grant:
        """Charge one request of about `tokens` to `key`; RateLimited if over a limit."""
        if tokens > (key.tpm or tokens):
            raise RateLimited(
                f"Request too large for key {key.name!r} on tokens per min: limit {key.tpm},"
                f" requested {tokens}. Send fewer tokens or a smaller max_tokens.",
                "tokens",
                {},
            )
        lease = uuid.uuid4().hex if key.max_parallel else None
        if self.shared and self._admit is not None:
            reply: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
            self._admits.append((key, tokens, lease or "", reply))
            self._schedule()
            try:
                return self._granted(key, tokens, lease, await reply)
            except (TimeoutError, RedisError, OSError) as exc:
                self._went_away(exc)
        share = max(1, self.gateways_alive)
        return self._granted(key, tokens, lease, self._local.admit(key, tokens, share), local=True)

    def settle(self, grant: Grant, used_tokens: int | None) -> None:
        """The request ended: free its lease and correct its tokens (off the request's path)."""
        delta = 0 if used_tokens is None or not grant.key.tpm else used_tokens - grant.charged_tokens
        if grant.local:
            self._local.settle(grant, delta)
            return
        if delta:
            self._settles[(self._base(grant.key), grant.minute)] += delta
        if grant.lease is not None:
            # Freed with the next script call, in this turn of the loop, not at the next beat:
            # a client's next request may follow at once, and must not find its last one
            # still counted.
            self._leases.pop(grant.lease, None)
            self._releases.append((self._base(grant.key), grant.lease))
            self._schedule()

    def _schedule(self) -> None:
        if not self._batch_due:
            self._batch_due = True
            asyncio.get_running_loop().call_soon(self._send_batch)

    def _send_batch(self) -> None:
        self._batch_due = False
        admits, self._admits = self._admits, []
        releases, self._releases = self._releases, []
        if admits or releases:
            task = asyncio.ensure_future(self._call(admits, releases))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _call(
        self, admits: list[tuple[ApiKey, int, str, asyncio.Future[_Reply]]], releases: list[tuple[str, str]]
    ) -> None:
        """One script call for `admits` and `releases`; each admit gets its reply or the error."""
        assert self._admit is not None
        index: dict[str, int] = {}  # base -> its place in KEYS, from 1 as Lua counts
        args: list[Any] = [len(admits), len(releases), self._lease_ms]
        for key, tokens, lease, _ in admits:
            k = index.setdefault(self._base(key), len(index) + 1)
            args.append(f"{k},{key.rpm or 0},{key.tpm or 0},{key.max_parallel or 0},{tokens},{lease}")
        for base, lease in releases:
            args.append(f"{index.setdefault(base, len(index) + 1)},{lease}")
        keys = list(index)
        try:
            async with asyncio.timeout(self._timeout_s):
                replies = await self._admit(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as exc:
            for *_, waiting in admits:
                if not waiting.done():
                    waiting.set_exception(exc)
            if not admits:
                self._went_away(exc)
            self._releases = releases + self._releases  # tried again with the next call or beat
            return
        now_ms = int(replies[0])
        for (key, _, lease, waiting), raw in zip(admits, replies[1:], strict=True):
            reply = _Reply.parse(raw, now_ms)
            if not waiting.done():
                waiting.set_result(reply)
            elif lease and not reply.denied:  # its client left meanwhile: nothing to hold
                self._releases.append((self._base(key), lease))
                self._schedule()

    async def run(self) -> None:
        """Settle, renew and beat about once a second; switch back to Redis once it answers."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self.beat()

    async def close(self) -> None:
        """Settle what is pending, then let go of Redis."""
        self._send_batch()
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        await self._flush()
        if self._client is not None:
            await self._client.aclose()

    async def beat(self) -> None:
        if self._releases:
            self._schedule()
        await self._flush(heartbeat=True)

    async def _flush(self, heartbeat: bool = False) -> None:
        if self._client is None or self._heartbeat is None:
            return
        settles, self._settles = self._settles, defaultdict(int)
        if not settles and not heartbeat:
            return
        leases = list(self._leases.items()) if heartbeat else []
        try:
            async with asyncio.timeout(self._timeout_s * 4):
                pipe = self._client.pipeline(transaction=False)
                for (base, minute), delta in settles.items():
                    if not delta:
                        continue
                    pipe.incrby(f"{base}:t:{minute}", delta)
                    pipe.pexpire(f"{base}:t:{minute}", 130_000)
                if heartbeat:
                    await self._heartbeat(
                        keys=[f"{self._prefix}:gateways", *(f"{base}:p" for _, base in leases)],
                        args=[
                            self.gateway_id,
                            self._lease_ms,
                            ALIVE_S * 1000,
                            *(lease for lease, _ in leases),
                        ],
                        client=pipe,
                    )
                replies = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            for slot, delta in self._settles.items():  # kept for the next beat
                settles[slot] += delta
            self._settles = settles
            self._went_away(exc)
            return
        if heartbeat:
            self.gateways_alive = max(1, int(replies[-1]))
            if not self.shared:
                log.info("limits: Redis answers again, enforcing across gateways")
            self.shared = True

    def _granted(
        self, key: ApiKey, tokens: int, lease: str | None, reply: _Reply, local: bool = False
    ) -> Grant:
        into = (reply.now_ms % WINDOW_MS) / WINDOW_MS
        requests = Window(key.rpm, reply.rc, reply.rp, into) if key.rpm else None
        tokens_window = Window(key.tpm, reply.tc, reply.tp, into) if key.tpm else None
        headers = _headers(requests, tokens_window)
        if reply.denied:
            raise _refusal(key, reply.denied, requests, tokens_window, tokens, headers)
        if lease is not None and not local:
            self._leases[lease] = self._base(key)
        grant = Grant(key, tokens if key.tpm else 0, reply.now_ms // WINDOW_MS, lease, local, [])
        grant.headers = [(name.encode(), value.encode()) for name, value in headers.items()]
        return grant

    def _went_away(self, exc: BaseException) -> None:
        if self.shared:
            log.warning(
                "limits: Redis unavailable (%r); enforcing locally, 1/%d of each limit",
                exc,
                max(1, self.gateways_alive),
            )
        self.shared = False

    def _base(self, key: ApiKey) -> str:
        return f"{self._prefix}:limits:{key.key_id}"


@dataclass(frozen=True, slots=True)
class _Reply:
    denied: str
    rc: float
    rp: float
    tc: float
    tp: float
    parallel: int
    now_ms: int

    @classmethod
    def parse(cls, reply: str | bytes, now_ms: int) -> _Reply:
        text = reply.decode() if isinstance(reply, bytes) else reply
        denied, rc, rp, tc, tp, parallel = text.split(",")
        # Lua writes numbers past 14 digits with an exponent: float() reads both.
        rc_, rp_, tc_, tp_, par_ = (int(float(v)) for v in (rc, rp, tc, tp, parallel))
        return cls(denied, rc_, rp_, tc_, tp_, par_, now_ms)


class _LocalCounters:
    """The same windows in this process, each limit divided among the gateways alive."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], float] = defaultdict(float)
        self._parallel: dict[str, int] = defaultdict(int)

    def admit(self, key: ApiKey, tokens: int, share: int) -> _Reply:
        now_ms = int(time.time() * 1000)
        minute = now_ms // WINDOW_MS
        self._forget_before(minute - 1)
        into = (now_ms % WINDOW_MS) / WINDOW_MS
        c = self._counts
        rc, rp = c[(key.key_id, "r", minute)], c[(key.key_id, "r", minute - 1)]
        tc, tp = c[(key.key_id, "t", minute)], c[(key.key_id, "t", minute - 1)]
        par = self._parallel[key.key_id]
        denied = ""
        if key.rpm and rc + rp * (1 - into) + 1 > _share(key.rpm, share):
            denied = "requests"
        elif key.tpm and tc + tp * (1 - into) + tokens > _share(key.tpm, share):
            denied = "tokens"
        elif key.max_parallel and par >= _share(key.max_parallel, share):
            denied = "parallel"
        if not denied:
            if key.rpm:
                rc = c[(key.key_id, "r", minute)] = rc + 1
            if key.tpm:
                tc = c[(key.key_id, "t", minute)] = tc + tokens
            if key.max_parallel:
                self._parallel[key.key_id] = par = par + 1
        # Scaled back up so the headers speak of the key's whole limit.
        return _Reply(denied, rc * share, rp * share, tc * share, tp * share, par, now_ms)

    def settle(self, grant: Grant, delta: int) -> None:
        if grant.key.max_parallel:
            self._parallel[grant.key.key_id] = max(0, self._parallel[grant.key.key_id] - 1)
        if delta:
            slot = (grant.key.key_id, "t", grant.minute)
            if slot in self._counts:
                self._counts[slot] = max(0.0, self._counts[slot] + delta)

    def _forget_before(self, minute: int) -> None:
        if len(self._counts) > 64 and any(m < minute for _, _, m in self._counts):
            for slot in [s for s in self._counts if s[2] < minute]:
                del self._counts[slot]


def _share(limit: int, gateways: int) -> int:
    """This gateway's part of a limit: never more than its share, never nothing."""
    return max(1, limit // gateways)


def _headers(requests: Window | None, tokens: Window | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = _duration(window.reset_s())
    return headers


def _refusal(
    key: ApiKey,
    denied: str,
    requests: Window | None,
    tokens: Window | None,
    cost: int,
    headers: dict[str, str],
) -> RateLimited:
    if denied == "requests" and requests is not None:
        wait = requests.fits_after_s(1)
        message = f"Rate limit reached for key {key.name!r} on requests per min: limit {requests.limit}."
        kind = "requests"
    elif denied == "tokens" and tokens is not None:
        wait = tokens.fits_after_s(cost)
        message = (
            f"Rate limit reached for key {key.name!r} on tokens per min: limit {tokens.limit},"
            f" requested {cost}."
        )
        kind = "tokens"
    else:
        wait = 1.0
        message = f"Too many requests at once for key {key.name!r}: limit {key.max_parallel}."
        kind = "requests"
    headers = {**headers, "Retry-After": str(max(1, math.ceil(wait)))}
    return RateLimited(f"{message} Please try again in {_duration(wait)}.", kind, headers)


def _duration(seconds: float) -> str:
    """As OpenAI writes it: `250ms`, `12.5s`, `1m30s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text
