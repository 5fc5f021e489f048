"""A full model's requests go out in turn across keys, weighted by priority, bounded.

A gateway over one stub worker that says it runs one request at a time (`max_num_seqs` 1)
and takes 0.15 s over each: the order in which the stub receives requests is the order the
gateway let them out. (Stub workers are fine here: what is tested is the gateway's queue; the
benchmark `benchmarks/fair_share.py` measures it on real engines.)
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.conftest import GatewayHandle, Servers, assert_openai_error
from vpool.config import FairShareSettings, KeyConfig

MODEL = "tiny-chat"
KEYS = [
    KeyConfig(key="sk-a", name="flood"),
    KeyConfig(key="sk-b", name="interactive"),
    KeyConfig(key="sk-c", name="important", priority=3),
]
DELAY_S = 0.15


def chat(tag: str) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": tag}], "max_tokens": 1}


async def until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await _value(check()):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        await asyncio.sleep(0.02)


async def _value(result: bool | Awaitable[bool]) -> bool:
    return await result if inspect.isawaitable(result) else bool(result)


class Fleet:
    def __init__(self, servers: Servers, start_stub, max_num_seqs: int | None = 1, **fair_share: object):
        self.stub = start_stub("slow", response_delay_s=DELAY_S)
        self.gateway: GatewayHandle = servers.gateway(keys=KEYS, fair_share=FairShareSettings(**fair_share))
        self.gateway.add_worker(self.stub, [MODEL], max_num_seqs=max_num_seqs)
        self.client = httpx.AsyncClient(base_url=self.gateway.url, timeout=30)
        # The worker answers nothing until `release`: the queues fill as the test says.
        self.stub.hold = threading.Event()

    def release(self) -> None:
        assert self.stub.hold is not None
        self.stub.hold.set()

    def send(self, key: str, tag: str) -> asyncio.Task[httpx.Response]:
        request = self.client.post(
            "/v1/chat/completions", json=chat(tag), headers={"Authorization": f"Bearer {key}"}
        )
        return asyncio.ensure_future(request)

    async def queue(self, key: str, *tags: str) -> list[asyncio.Task[httpx.Response]]:
        """Send one request per tag, each once the one before waits: their order is known."""
        sent = []
        for tag in tags:
            before = await self.waiting()
            sent.append(self.send(key, tag))
            await self.wait_for_waiting(before + 1)
        return sent

    async def waiting(self) -> int:
        return sum((await self.client.get("/health")).json()["waiting"].values())

    async def wait_for_waiting(self, n: int) -> None:
        async def check() -> bool:
            return await self.waiting() == n

        await until(check, f"{n} requests waiting")

    def order(self) -> list[str]:
        return [r.json()["messages"][0]["content"] for r in self.stub.received]


@pytest.fixture
async def fleet(servers: Servers, start_stub):
    made: list[Fleet] = []

    def make(**options: object) -> Fleet:
        made.append(Fleet(servers, start_stub, **options))
        return made[-1]

    yield make
    for f in made:
        await f.client.aclose()


async def test_a_full_model_lets_keys_out_in_turn_not_first_come(fleet) -> None:
    f = fleet()
    flood = [f.send("sk-a", "A1")]
    await until(lambda: f.stub.count == 1, "A1 reaches the worker")
    flood += await f.queue("sk-a", "A2", "A3", "A4")
    interactive = await f.queue("sk-b", "B1", "B2")
    f.release()
    answers = await asyncio.gather(*flood, *interactive)
    assert [r.status_code for r in answers] == [200] * 6
    # First come would be A1 A2 A3 A4 B1 B2: B's requests go out between A's instead.
    assert f.order() == ["A1", "A2", "B1", "A3", "B2", "A4"]
    assert await f.waiting() == 0


async def test_a_key_of_priority_three_gets_three_turns_to_one(fleet) -> None:
    f = fleet()
    first = f.send("sk-a", "A1")
    await until(lambda: f.stub.count == 1, "A1 reaches the worker")
    rest = await f.queue("sk-a", "A2", "A3", "A4")
    rest += await f.queue("sk-c", "C1", "C2", "C3", "C4")
    f.release()
    await asyncio.gather(first, *rest)
    assert f.order() == ["A1", "A2", "C1", "C2", "C3", "A3", "C4", "A4"]


async def test_over_the_queue_bounds_and_past_the_deadline_the_answer_is_an_openai_error(fleet) -> None:
    f = fleet(max_queued_per_key=2, max_queued=3, max_wait_s=30)
    running = f.send("sk-a", "A1")
    await until(lambda: f.stub.count == 1, "A1 reaches the worker")
    queued = await f.queue("sk-a", "A2", "A3")
    over_key = await f.send("sk-a", "A4")
    error = assert_openai_error(over_key, 429)
    assert error["code"] == "queue_full" and over_key.headers["retry-after"] == "1"
    assert "2 requests waiting" in error["message"]
    queued += await f.queue("sk-b", "B1")
    over_all = await f.send("sk-c", "C1")
    error = assert_openai_error(over_all, 503)
    assert error["code"] == "queue_full" and over_all.headers["retry-after"] == "1"
    f.release()
    assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200] * 4
    assert "A4" not in f.order() and "C1" not in f.order()

    g = fleet(max_wait_s=0.3)
    slow = g.send("sk-a", "slow")
    await until(lambda: g.stub.count == 1, "the slow request reaches the worker")
    late = await g.send("sk-b", "late")
    error = assert_openai_error(late, 503)
    assert error["code"] == "queue_timeout" and late.headers["retry-after"] == "1"
    assert await g.waiting() == 0
    g.release()
    assert (await slow).status_code == 200
    assert g.order() == ["slow"]


async def test_a_client_that_leaves_while_waiting_leaves_its_queue_at_once(fleet) -> None:
    f = fleet()
    running = f.send("sk-a", "A1")
    await until(lambda: f.stub.count == 1, "A1 reaches the worker")
    leaving = f.send("sk-b", "gone")
    await f.wait_for_waiting(1)
    leaving.cancel()  # httpx closes the connection: the client has left
    left_at = time.monotonic()
    await f.wait_for_waiting(0)
    assert time.monotonic() - left_at < 0.5
    after = f.send("sk-b", "B2")
    f.release()
    assert (await running).status_code == 200 and (await after).status_code == 200
    assert f.order() == ["A1", "B2"]  # the worker never saw the request whose client left
    # Counted as a client that left (499), not as a refusal of the gateway's.
    metrics = (await f.client.get("/metrics")).text
    statuses = {
        s.labels["status"]: s.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "vpool_requests"
        for s in family.samples
        if s.name == "vpool_requests_total" and s.labels["route"] == "chat"
    }
    assert statuses == {"200": 2.0, "499": 1.0}


async def test_a_key_alone_gets_every_place_and_leaves_one_while_another_key_is_about(fleet) -> None:
    f = fleet(max_num_seqs=3)
    alone = [f.send("sk-a", f"A{i}") for i in (1, 2, 3)]
    await until(lambda: f.stub.count == 3, "a key alone fills every place")
    f.release()
    await asyncio.gather(*alone)

    g = fleet(max_num_seqs=3)
    g.release()
    assert (await g.send("sk-b", "B1")).status_code == 200  # B has asked for the model lately
    g.stub.hold = threading.Event()
    flood = [g.send("sk-a", f"A{i}") for i in (1, 2)]
    await until(lambda: g.stub.count == 3, "A takes two places")
    flood += await g.queue("sk-a", "A3")  # the last place is kept: A3 waits although it is free
    await asyncio.sleep(0.6)
    assert g.stub.count == 3 and await g.waiting() == 1
    interactive = g.send("sk-b", "B2")
    await until(lambda: g.stub.count == 4, "B2 starts at once, in the kept place")
    assert await g.waiting() == 1
    g.release()
    assert [r.status_code for r in await asyncio.gather(*flood, interactive)] == [200] * 4
    assert g.order()[0] == "B1" and g.order()[3:] == ["B2", "A3"]


@pytest.mark.parametrize(
    "options",
    [{"enabled": False}, {"max_num_seqs": None}],
    ids=["fair share off", "the worker does not say its limit"],
)
async def test_with_nothing_to_hold_requests_go_straight_to_the_worker(fleet, options) -> None:
    f = fleet(**options)
    sent = [f.send("sk-a", f"A{i}") for i in range(4)]
    await until(lambda: f.stub.count == 4, "all four reach the worker at once", 2.0)
    assert await f.waiting() == 0
    f.release()
    assert [r.status_code for r in await asyncio.gather(*sent)] == [200] * 4


async def test_what_other_gateways_run_on_a_worker_counts_against_its_room(fleet) -> None:
    f = fleet(max_num_seqs=None)
    f.gateway.clear()
    # The worker takes 3 at once; its heartbeat says 2 run there, none of them this gateway's.
    worker = f.gateway.add_worker(f.stub, [MODEL], max_num_seqs=3, running=2).worker_id
    first = f.send("sk-a", "A1")
    await until(lambda: f.stub.count == 1, "A1 reaches the worker")
    # Its next heartbeat counts A1 too: the one place left was this gateway's.
    f.gateway.add_worker(f.stub, [MODEL], worker_id=worker, max_num_seqs=3, running=3)
    second = f.send("sk-a", "A2")
    await f.wait_for_waiting(1)
    await asyncio.sleep(1.0)  # refreshes come and go: still no room
    assert f.stub.count == 1 and await f.waiting() == 1
    f.release()
    assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]
