"""One contract for every registry backend: memory, and Redis against a real server.

The Redis cases need the server CI guarantees on 127.0.0.1:6379; without it they fail, they
do not skip. Each Redis case writes under its own random key prefix and deletes it after.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.protocol import Registry, RegistryUnavailable
from vpool.registry.records import JobRecord, JobState, WorkerLoad, WorkerRecord, WorkerState
from vpool.registry.redis_backend import RedisRegistry

REDIS_URL = "redis://127.0.0.1:6379/0"
TTL_S = 10.0
SHORT_TTL_S = 0.3


def make_record(worker_id: str = "w1", **changes: object) -> WorkerRecord:
    fields: dict[str, object] = {
        "worker_id": worker_id,
        "url": f"http://127.0.0.1:9000/{worker_id}",
        "models": ["tiny-llama", "tiny"],
        "model_path": "/models/tiny",
        "state": WorkerState.READY,
        "load": WorkerLoad(
            running=1, waiting=2, kv_cache_usage=0.125, prefix_cache_queries=4096, prefix_cache_hits=1024
        ),
    }
    fields.update(changes)
    return WorkerRecord.model_validate(fields)


@asynccontextmanager
async def redis_backend(prefix: str) -> AsyncIterator[tuple[RedisRegistry, Redis]]:
    """A RedisRegistry under `prefix`, and a raw client to look behind it; cleans up after."""
    raw = Redis.from_url(REDIS_URL, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        await raw.ping()
    except (RedisError, OSError) as exc:
        await raw.aclose()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} (CI guarantees one): {exc}")
    registry = RedisRegistry.from_url(REDIS_URL, key_prefix=prefix, timeout_s=2.0)
    try:
        yield registry, raw
    finally:
        await registry.close()
        try:
            keys = [key async for key in raw.scan_iter(match=f"{prefix}:*")]
            if keys:
                await raw.delete(*keys)
        finally:
            await raw.aclose()


def unique_prefix() -> str:
    return f"vpool-test-{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", "redis"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    if request.param == "memory":
        memory = MemoryRegistry()
        yield memory
        await memory.close()
        return
    async with redis_backend(unique_prefix()) as (redis_registry, _):
        yield redis_registry


async def test_put_then_get_returns_an_equal_record(registry: Registry) -> None:
    record = make_record()
    await registry.put(record, TTL_S)
    assert await registry.get("w1") == record


async def test_get_of_unknown_worker_returns_none(registry: Registry) -> None:
    assert await registry.get("nobody") is None


async def test_list_workers_lists_every_live_record(registry: Registry) -> None:
    records = [make_record(f"w{i}") for i in range(5)]
    for record in records:
        await registry.put(record, TTL_S)
    listed = await registry.list_workers()
    assert sorted(listed, key=lambda r: r.worker_id) == records


async def test_list_workers_of_an_empty_registry_is_empty(registry: Registry) -> None:
    assert await registry.list_workers() == []


async def test_record_without_heartbeat_disappears_when_its_ttl_passes(registry: Registry) -> None:
    await registry.put(make_record("short"), SHORT_TTL_S)
    await registry.put(make_record("long"), TTL_S)
    await asyncio.sleep(SHORT_TTL_S + 0.2)
    assert await registry.get("short") is None
    assert [r.worker_id for r in await registry.list_workers()] == ["long"]


async def test_heartbeat_refreshes_load_and_keeps_worker_alive(registry: Registry) -> None:
    record = make_record(last_heartbeat=time.time() - 60)
    ttl_s = 0.6
    await registry.put(record, ttl_s)
    await asyncio.sleep(0.4)
    # The engine's prefix-cache counters travel with the load, whole.
    load = WorkerLoad(
        running=7, waiting=3, kv_cache_usage=0.5, prefix_cache_queries=2**40, prefix_cache_hits=3
    )
    before = time.time()
    updated = await registry.heartbeat("w1", load, ttl_s)

    assert updated is not None
    assert updated.load == load
    assert updated.last_heartbeat >= before
    assert updated.model_dump(exclude={"load", "last_heartbeat"}) == record.model_dump(
        exclude={"load", "last_heartbeat"}
    )
    # Past the original TTL, alive thanks to the heartbeat, and stored as returned.
    await asyncio.sleep(0.4)
    assert await registry.get("w1") == updated
    assert await registry.list_workers() == [updated]


async def test_heartbeat_of_unknown_worker_returns_none_and_creates_nothing(
    registry: Registry,
) -> None:
    assert await registry.heartbeat("ghost", WorkerLoad(running=1), TTL_S) is None
    assert await registry.get("ghost") is None
    assert await registry.list_workers() == []


async def test_heartbeat_after_expiry_does_not_revive_the_worker(registry: Registry) -> None:
    await registry.put(make_record(), SHORT_TTL_S)
    await asyncio.sleep(SHORT_TTL_S + 0.2)
    assert await registry.heartbeat("w1", WorkerLoad(), TTL_S) is None
    assert await registry.get("w1") is None


async def test_set_state_changes_state_and_returns_the_updated_record(registry: Registry) -> None:
    record = make_record()
    await registry.put(record, TTL_S)
    updated = await registry.set_state("w1", WorkerState.DRAINING, TTL_S)

    assert updated == record.model_copy(update={"state": WorkerState.DRAINING})
    assert await registry.get("w1") == updated


async def test_set_state_refreshes_the_ttl(registry: Registry) -> None:
    await registry.put(make_record(), SHORT_TTL_S)
    assert await registry.set_state("w1", WorkerState.GONE, TTL_S) is not None
    await asyncio.sleep(SHORT_TTL_S + 0.2)
    gone = await registry.get("w1")
    assert gone is not None and gone.state is WorkerState.GONE


async def test_set_state_of_unknown_worker_returns_none(registry: Registry) -> None:
    assert await registry.set_state("ghost", WorkerState.DRAINING, TTL_S) is None
    assert await registry.get("ghost") is None
    assert await registry.list_workers() == []


async def test_remove_deletes_the_record(registry: Registry) -> None:
    await registry.put(make_record("w1"), TTL_S)
    await registry.put(make_record("w2"), TTL_S)
    await registry.remove("w1")
    assert await registry.get("w1") is None
    assert [r.worker_id for r in await registry.list_workers()] == ["w2"]
    await registry.remove("w1")  # removing twice is harmless


async def test_put_replaces_an_existing_record(registry: Registry) -> None:
    await registry.put(make_record(state=WorkerState.DRAINING), TTL_S)
    fresh = make_record(
        url="http://127.0.0.1:9999",
        models=["other-model"],
        state=WorkerState.READY,
        load=WorkerLoad(),
    )
    await registry.put(fresh, TTL_S)
    assert await registry.get("w1") == fresh
    assert await registry.list_workers() == [fresh]


async def test_callers_cannot_mutate_stored_records(registry: Registry) -> None:
    record = make_record()
    expected = record.model_copy(deep=True)
    await registry.put(record, TTL_S)
    record.models.append("sneaky")
    fetched = await registry.get("w1")
    assert fetched is not None
    fetched.load.running = 99
    fetched.state = WorkerState.FAILED
    assert await registry.get("w1") == expected


async def test_redis_records_under_different_prefixes_do_not_see_each_other() -> None:
    async with redis_backend(unique_prefix()) as (first, _):
        second = RedisRegistry(Redis.from_url(REDIS_URL), key_prefix=unique_prefix())
        try:
            await first.put(make_record("a"), TTL_S)
            await second.put(make_record("b"), TTL_S)
            assert [r.worker_id for r in await first.list_workers()] == ["a"]
            assert [r.worker_id for r in await second.list_workers()] == ["b"]
            assert await first.get("b") is None
            assert await second.heartbeat("a", WorkerLoad(), TTL_S) is None
        finally:
            await second.remove("b")
            await second.close()


async def test_redis_heartbeat_of_unknown_worker_writes_no_key() -> None:
    prefix = unique_prefix()
    async with redis_backend(prefix) as (registry, raw):
        await registry.heartbeat("ghost", WorkerLoad(running=1), TTL_S)
        await registry.set_state("ghost", WorkerState.READY, TTL_S)
        assert [key async for key in raw.scan_iter(match=f"{prefix}:*")] == []


async def test_redis_list_workers_prunes_ids_of_expired_workers() -> None:
    prefix = unique_prefix()
    async with redis_backend(prefix) as (registry, raw):
        await registry.put(make_record("short"), SHORT_TTL_S)
        await registry.put(make_record("long"), TTL_S)
        await asyncio.sleep(SHORT_TTL_S + 0.2)
        assert [r.worker_id for r in await registry.list_workers()] == ["long"]
        assert await raw.smembers(f"{prefix}:workers") == {b"long"}


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: Redis frozen (SIGSTOP, GC pause)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("failure", ["absent", "frozen"])
async def test_frozen_or_absent_redis_raises_registry_unavailable(failure: str, silent_port: int) -> None:
    port = 1 if failure == "absent" else silent_port
    registry = RedisRegistry.from_url(
        f"redis://127.0.0.1:{port}/0", key_prefix=unique_prefix(), timeout_s=0.2
    )
    try:
        for call in (
            registry.list_workers,
            lambda: registry.heartbeat("w1", WorkerLoad(), TTL_S),
        ):
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable, match=f"127.0.0.1:{port}"):
                await call()
            assert time.monotonic() - started < 1.5
    finally:
        await registry.close()


# --- jobs ---------------------------------------------------------------------------------


def make_job(job_id: str = "41", **changes: object) -> JobRecord:
    fields: dict[str, object] = {
        "job_id": job_id,
        "launcher": "slurm",
        "model": "tiny-chat",
        "state": JobState.PENDING,
        "reason": "Resources",
        "config": {"partition": "debug", "gpus_per_node": 1},
        "log_dir": f"/logs/tiny/tiny-chat.{job_id}",
    }
    fields.update(changes)
    return JobRecord.model_validate(fields)


async def test_a_job_put_is_got_back_equal_and_replaced_whole(registry: Registry) -> None:
    job = make_job()
    await registry.put_job(job)
    assert await registry.get_job("41") == job
    ready = job.model_copy(
        update={"state": JobState.READY, "reason": None, "worker_urls": ["http://n1:9000"]}
    )
    await registry.put_job(ready)
    assert await registry.get_job("41") == ready
    assert await registry.get_job("nobody") is None


async def test_jobs_are_listed_oldest_first_and_outlive_any_worker_ttl(registry: Registry) -> None:
    for i, submitted in enumerate([30.0, 10.0, 20.0]):
        await registry.put_job(make_job(str(100 + i), submitted_at=submitted))
    await registry.put(make_record("short"), SHORT_TTL_S)
    await asyncio.sleep(SHORT_TTL_S + 0.2)
    assert [j.job_id for j in await registry.list_jobs()] == ["101", "102", "100"]


async def test_a_removed_job_is_gone(registry: Registry) -> None:
    await registry.put_job(make_job("7"))
    await registry.remove_job("7")
    await registry.remove_job("never-there")
    assert await registry.get_job("7") is None
    assert await registry.list_jobs() == []


async def test_jobs_handed_out_are_copies(registry: Registry) -> None:
    await registry.put_job(make_job("9"))
    job = await registry.get_job("9")
    assert job is not None
    job.worker_ids.append("changed-outside")
    again = await registry.get_job("9")
    assert again is not None and again.worker_ids == []


# --- gateways -----------------------------------------------------------------------------


async def test_announced_gateways_are_listed_by_url_apart_from_workers(registry: Registry) -> None:
    await registry.announce_gateway("http://gw-b:8000", TTL_S)
    await registry.announce_gateway("http://gw-a:8000", TTL_S)
    await registry.put(make_record("w1"), TTL_S)
    gateways = await registry.list_gateways()
    assert [g.url for g in gateways] == ["http://gw-a:8000", "http://gw-b:8000"]
    assert all(time.time() - g.announced_at < 5 for g in gateways)
    assert [r.worker_id for r in await registry.list_workers()] == ["w1"]


async def test_a_gateway_that_stops_announcing_disappears_when_its_ttl_passes(registry: Registry) -> None:
    await registry.announce_gateway("http://gone:8000", SHORT_TTL_S)
    await registry.announce_gateway("http://alive:8000", SHORT_TTL_S)
    await asyncio.sleep(SHORT_TTL_S / 2)
    await registry.announce_gateway("http://alive:8000", SHORT_TTL_S)  # announcing again renews it
    await asyncio.sleep(SHORT_TTL_S / 2 + 0.1)
    assert [g.url for g in await registry.list_gateways()] == ["http://alive:8000"]


async def test_a_withdrawn_gateway_is_gone_at_once(registry: Registry) -> None:
    await registry.announce_gateway("http://gw:8000", TTL_S)
    await registry.withdraw_gateway("http://gw:8000")
    await registry.withdraw_gateway("http://never-there:8000")
    assert await registry.list_gateways() == []


async def test_redis_list_gateways_prunes_urls_of_expired_announcements() -> None:
    prefix = unique_prefix()
    async with redis_backend(prefix) as (registry, raw):
        await registry.announce_gateway("http://short:8000", SHORT_TTL_S)
        await registry.announce_gateway("http://long:8000", TTL_S)
        assert 0 < await raw.pttl(f"{prefix}:announced-gateway:http://long:8000") <= TTL_S * 1000
        await asyncio.sleep(SHORT_TTL_S + 0.2)
        assert [g.url for g in await registry.list_gateways()] == ["http://long:8000"]
        assert await raw.smembers(f"{prefix}:announced-gateways") == {b"http://long:8000"}
