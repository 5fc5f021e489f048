"""Per-key limits hold across gateways through one Redis, and hold apart when it is away.

Two `RateLimiter`s over the same Redis are two gateways; then whole gateways over stub
workers show what a client sees: `x-ratelimit-*` on every answer, 429 in OpenAI's shape
with `Retry-After`, tokens settled with the worker's count, and usage per key and model.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.redis_server import RedisServer, running_redis
from tests.unit.conftest import GatewayHandle, Servers, assert_openai_error
from vpool.config import KeyConfig, RegistrySettings
from vpool.gateway.limits import RateLimited, RateLimiter
from vpool.registry.key_stores import SqliteKeyStore
from vpool.registry.keys import ApiKey
from vpool.registry.redis_backend import RedisRegistry
from vpool.registry.redis_client import redis_client
from vpool.registry.usage import UsageQuery

REDIS_URL = "redis://127.0.0.1:6379/0"
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@asynccontextmanager
async def two_gateways(
    url: str = REDIS_URL, **options: float
) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    prefix = f"vpool-limits-test-{uuid.uuid4().hex[:8]}"
    a = RateLimiter(redis_client(url, 1.0), prefix, gateway_id="a", **options)  # type: ignore[arg-type]
    b = RateLimiter(redis_client(url, 1.0), prefix, gateway_id="b", **options)  # type: ignore[arg-type]
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def key(**limits: int) -> ApiKey:
    return ApiKey(name="team", **limits)


async def test_requests_per_minute_hold_across_two_gateways() -> None:
    team = key(rpm=5)
    async with two_gateways() as (a, b):
        remaining = []
        for limiter in (a, b, a, b, a):
            grant = await limiter.admit(team, 0)
            remaining.append(dict(grant.headers)[b"x-ratelimit-remaining-requests"])
            assert dict(grant.headers)[b"x-ratelimit-limit-requests"] == b"5"
        assert remaining == [b"4", b"3", b"2", b"1", b"0"]
        with pytest.raises(RateLimited) as refused:
            await b.admit(team, 0)
        assert refused.value.status_code == 429 and refused.value.error_type == "requests"
        assert refused.value.code == "rate_limit_exceeded"
        assert 1 <= int(refused.value.headers["Retry-After"]) <= 120
        assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
        # another key is another budget
        await a.admit(key(rpm=1), 0)


async def test_parallel_requests_hold_across_gateways_and_free_when_one_ends() -> None:
    team = key(max_parallel=2)
    async with two_gateways() as (a, b):
        first = await a.admit(team, 0)
        await b.admit(team, 0)
        with pytest.raises(RateLimited, match="at once"):
            await a.admit(team, 0)
        a.settle(first, None)
        deadline = time.monotonic() + 2
        while True:  # freed at once, not at the next beat: one Redis write away
            try:
                await b.admit(team, 0)
                break
            except RateLimited:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)


async def test_requests_of_one_loop_turn_share_one_redis_call_and_each_gets_its_own_answer() -> None:
    team, other = key(rpm=5), key(max_parallel=1)
    async with two_gateways() as (a, _):
        calls = 0
        script = a._admit
        assert script is not None

        async def counted(*args, **kwargs):
            nonlocal calls
            calls += 1
            return await script(*args, **kwargs)

        a._admit = counted  # type: ignore[assignment]
        answers = await asyncio.gather(
            *(a.admit(team, 0) for _ in range(8)), a.admit(other, 0), return_exceptions=True
        )
        assert calls == 1
        granted = [r for r in answers[:8] if not isinstance(r, BaseException)]
        refused = [r for r in answers[:8] if isinstance(r, RateLimited)]
        assert len(granted) == 5 and len(refused) == 3
        assert sorted(dict(g.headers)[b"x-ratelimit-remaining-requests"] for g in granted) == [
            b"0", b"1", b"2", b"3", b"4",
        ]  # fmt: skip
        held = answers[8]
        assert not isinstance(held, BaseException)
        # Its lease is freed by the same call that admits the next: one call again.
        a.settle(held, None)
        again = await a.admit(other, 0)
        assert calls == 2 and again.lease is not None


async def test_tokens_are_charged_up_front_and_settled_with_the_real_count() -> None:
    team = key(tpm=100)
    async with two_gateways() as (a, b):
        first = await a.admit(team, 60)
        with pytest.raises(RateLimited) as refused:
            await b.admit(team, 60)
        assert refused.value.error_type == "tokens" and "tokens per min" in refused.value.message
        a.settle(first, 20)  # the worker counted 20: 40 given back
        await a.beat()
        grant = await b.admit(team, 60)
        assert dict(grant.headers)[b"x-ratelimit-remaining-tokens"] == b"20"
        with pytest.raises(RateLimited, match="Request too large"):
            await a.admit(team, 101)


async def test_a_dead_gateways_leases_expire_and_a_live_ones_are_renewed() -> None:
    team = key(max_parallel=1)
    async with two_gateways(lease_s=1.0) as (a, b):
        await a.admit(team, 0)  # a holds it and renews it
        for _ in range(4):
            await asyncio.sleep(0.4)
            await a.beat()
            with pytest.raises(RateLimited):
                await b.admit(team, 0)
        # a dies (no more beats): its lease lapses within lease_s
        await asyncio.sleep(1.2)
        await b.admit(team, 0)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis() as server:
        yield server


async def test_with_redis_away_each_gateway_enforces_its_share_and_never_waits(
    private_redis: RedisServer,
) -> None:
    team = key(rpm=4)
    async with two_gateways(private_redis.url, timeout_s=0.25) as (a, b):
        await a.beat()
        await b.beat()
        await a.beat()
        assert a.gateways_alive == 2 and a.mode == "shared"
        private_redis.stop()
        started = time.monotonic()
        await a.admit(team, 0)
        assert time.monotonic() - started < 1.0 and a.mode == "degraded"
        await a.admit(team, 0)  # its share: half of 4
        with pytest.raises(RateLimited):
            await a.admit(team, 0)
        assert time.monotonic() - started < 2.0
        private_redis.start()
        deadline = time.monotonic() + 5
        while a.mode != "shared":
            assert time.monotonic() < deadline
            await a.beat()
            await asyncio.sleep(0.1)


# --- what a client of a gateway sees --------------------------------------------------------


@pytest.fixture
def limited(
    servers: Servers, start_stub, tmp_path: Path
) -> Iterator[tuple[GatewayHandle, GatewayHandle, SqliteKeyStore]]:
    """Two gateways sharing limits through Redis, each with the same config keys."""
    prefix = f"vpool-limits-test-{uuid.uuid4().hex[:8]}"
    keys = [
        KeyConfig(key="sk-rpm", name="by-minute", rpm=3),
        KeyConfig(key="sk-tpm", name="by-tokens", tpm=200),
        KeyConfig(key="sk-free", name="free"),
    ]
    store = SqliteKeyStore(tmp_path / "keys.sqlite3")
    stub = start_stub("a")
    gateways = []
    for _ in range(2):
        g = servers.gateway(
            keys=keys, key_store=store, registry=RegistrySettings(url=REDIS_URL, key_prefix=prefix)
        )
        g.add_worker(stub, ["tiny-chat"])
        gateways.append(g)
    yield gateways[0], gateways[1], store


def test_every_answer_says_the_limits_and_a_refusal_is_openai_shaped(limited) -> None:
    one, two, _ = limited
    auth = {"Authorization": "Bearer sk-rpm"}
    seen = []
    for url in (one.url, two.url, one.url):
        resp = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth)
        assert resp.status_code == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
        seen.append(resp.headers["x-ratelimit-remaining-requests"])
    assert seen == ["2", "1", "0"]
    with httpx.stream(
        "POST", f"{two.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth
    ) as s:
        refused = s.read() and s
    error = assert_openai_error(refused, 429)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "requests per min: limit 3" in error["message"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # a key without limits carries no limit headers, and is not held back
    free = httpx.post(
        f"{one.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-free"}
    )
    assert free.status_code == 200 and "x-ratelimit-limit-requests" not in free.headers
    health = httpx.get(f"{one.url}/health").json()
    assert health["limits"] == "shared" and health["status"] == "ok"


def test_streams_carry_the_token_limits_and_usage_is_counted_per_key_and_model(limited) -> None:
    one, two, store = limited
    auth = {"Authorization": "Bearer sk-tpm"}
    with httpx.stream(
        "POST", f"{one.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth
    ) as s:
        assert s.status_code == 200
        assert s.headers["x-ratelimit-limit-tokens"] == "200"
        assert int(s.headers["x-ratelimit-remaining-tokens"]) < 200
        s.read()
    answered = httpx.post(f"{two.url}/v1/chat/completions", json=CHAT, headers=auth)
    assert answered.json()["usage"]["total_tokens"] == 6
    too_big = httpx.post(f"{two.url}/v1/chat/completions", json={**CHAT, "max_tokens": 500}, headers=auth)
    assert "Request too large" in assert_openai_error(too_big, 429)["message"]

    def counted() -> list:
        rows = asyncio.run(store.usage(UsageQuery(key_id="config-1")))
        return [(r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.errors) for r in rows]

    deadline = time.monotonic() + 5
    # stream (no usage from the stub) + a whole answer (3 + 3) + the refused one, as an error
    while counted() != [("tiny-chat", 3, 3, 3, 1)]:
        assert time.monotonic() < deadline, counted()
        time.sleep(0.1)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{two.url}/metrics").text)}
    tokens = {
        (s.labels["key"], s.labels["model"], s.labels["kind"]): s.value
        for s in families["vpool_tokens"].samples
        if s.name == "vpool_tokens_total"
    }
    assert tokens == {("by-tokens", "tiny-chat", "prompt"): 3, ("by-tokens", "tiny-chat", "completion"): 3}


async def test_limits_and_gateway_discovery_share_a_redis_prefix_without_clobbering_each_other() -> None:
    """A gateway's limits and its announcement for discovery live under the one configured
    prefix; each must keep working whichever of them wrote first."""
    prefix = f"vpool-limits-test-{uuid.uuid4().hex[:8]}"
    client = redis_client(REDIS_URL, 1.0)
    registry = RedisRegistry(client, key_prefix=prefix)
    limiter = RateLimiter(redis_client(REDIS_URL, 1.0), prefix, gateway_id="a")  # type: ignore[arg-type]
    try:
        for first_announce in (True, False):
            if first_announce:
                await registry.announce_gateway("http://gw-a:8000", 15)
            await limiter.beat()
            await registry.announce_gateway("http://gw-a:8000", 15)
            await limiter.beat()
            assert limiter.mode == "shared"
            assert [g.url for g in await registry.list_gateways()] == ["http://gw-a:8000"]
    finally:
        await limiter.close()
        await client.aclose()
