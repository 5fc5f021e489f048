"""Background loops stop when asked, even when a library swallows their cancellation."""

from __future__ import annotations

import asyncio
import uuid

from vpool.background import cancel_and_wait
from vpool.registry.redis_backend import RedisRegistry

REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_a_loop_whose_call_swallows_one_cancellation_still_stops() -> None:
    inside_call = asyncio.Event()

    async def call_that_swallows_cancellation() -> None:
        inside_call.set()
        try:
            await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            return  # what redis-py 8.1 sometimes does on Python 3.11

    async def loop() -> None:
        while True:
            await call_that_swallows_cancellation()
            await asyncio.sleep(0.05)

    plain = asyncio.create_task(loop())
    await inside_call.wait()
    plain.cancel()
    await asyncio.sleep(0.1)
    assert not plain.done()  # one cancel was not enough: awaiting it would hang

    assert await cancel_and_wait(plain, timeout_s=2.0)
    assert plain.done()


async def test_loops_polling_a_real_redis_always_stop() -> None:
    registry = RedisRegistry.from_url(REDIS_URL, key_prefix=f"test-{uuid.uuid4().hex[:8]}", timeout_s=1.0)

    async def poll() -> None:  # like the gateway's fleet refresh, with less sleep
        while True:
            await registry.list_workers()
            await asyncio.sleep(0.002)

    try:
        for trial in range(40):
            task = asyncio.create_task(poll())
            await asyncio.sleep(0.001 * (trial % 5))
            assert await cancel_and_wait(task, timeout_s=5.0), f"trial {trial}: the loop kept running"
    finally:
        await registry.close()


async def test_a_task_that_ignores_every_cancellation_is_reported_not_awaited_forever() -> None:
    released = False

    async def stubborn() -> None:
        while not released:
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, timeout_s=0.3) is False
    released = True  # let it end with the test
    assert await cancel_and_wait(task, timeout_s=2.0)
