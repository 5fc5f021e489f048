"""Redis goes away, freezes, comes back empty: vpool in split mode keeps serving and heals.

A private `redis-server` (tests/support/redis_server.py) that the tests stop, freeze with
SIGSTOP, resume and restart; a controller and a gateway as real `vpool` processes over it;
two stub workers kept registered by the real `keep_registered` loop. Heartbeats every
0.4 s (TTL 1.2 s) and a 0.25 s registry timeout keep the whole module to a few seconds a case.
Each case starts from a whole fleet and leaves Redis serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import Proc, free_port
from tests.support.redis_server import RedisServer, running_redis
from tests.support.stub_worker import StubWorker
from vpool.gateway.fleet import Fleet
from vpool.gateway.routing import make_policy
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.records import Registration, WorkerLoad, WorkerRecord, WorkerState
from vpool.registry.redis_backend import RedisRegistry
from vpool.worker.registration import ControllerClient, keep_registered

MODEL = "tiny-chat"
HEARTBEAT_S = 0.4
EXPIRY_INTERVALS = 3
TTL_S = HEARTBEAT_S * EXPIRY_INTERVALS
REGISTRY_TIMEOUT_S = 0.25
REFRESH_S = 0.2
# What "bounded" means here: the request path never waits on Redis at all, and a registry
# call gives up after REGISTRY_TIMEOUT_S; the rest is slack for two shared CPU cores.
REQUEST_BOUND_S = 1.5
HEAL_TIMEOUT_S = 10.0
WORKERS = ("w1", "w2")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


# --- the fleet: real processes over a private Redis ---------------------------------------------


@dataclass
class FakeWorker:
    """A stub OpenAI server kept registered by vpool's own heartbeat loop, in its thread."""

    stub: StubWorker
    heartbeats: concurrent.futures.Future[None]  # the keep_registered loop, on the stub's loop
    stopped: threading.Event

    def stop_heartbeats(self) -> None:
        self.heartbeats.cancel()
        self.stopped.wait(5)


def start_fake_worker(stack: contextlib.ExitStack, name: str, controller_url: str) -> FakeWorker:
    stub = StubWorker(name)
    stack.enter_context(stub.running())
    registration = Registration(worker_id=name, url=stub.url, models=[MODEL])
    stopped = threading.Event()

    async def heartbeat_forever() -> None:
        client = ControllerClient(controller_url, None, timeout_s=5.0)
        try:
            await keep_registered(client, registration, WorkerLoad, retry_max_s=1.0)
        finally:
            await client.aclose()
            stopped.set()

    heartbeats = asyncio.run_coroutine_threadsafe(heartbeat_forever(), stub.server.loop)
    worker = FakeWorker(stub, heartbeats, stopped)
    stack.callback(worker.stop_heartbeats)  # before the stub's server stops (last in, first out)
    return worker


@dataclass
class SplitFleet:
    redis: RedisServer
    controller_url: str
    gateway_url: str
    config_path: Path
    workdir: Path
    http: httpx.Client
    procs: list[Proc] = field(default_factory=list)
    workers: dict[str, FakeWorker] = field(default_factory=dict)

    def spawn(self, name: str, *args: str) -> Proc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VPOOL_")}
        env["PYTHONUNBUFFERED"] = "1"
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "vpool.cli", *args, "--config", str(self.config_path)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop_processes(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)

    def wait_serving(self, proc: Proc, url: str) -> None:
        def answers() -> bool:
            assert proc.popen.poll() is None, f"{proc.name} exited:\n{proc.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                return self.http.get(url + "/health", timeout=1).status_code == 200
            return False

        wait_for(answers, 20, f"{proc.name} serving")

    def health(self, url: str | None = None) -> dict[str, Any]:
        resp = self.http.get((url or self.gateway_url) + "/health", timeout=2)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def controller_health(self) -> dict[str, Any]:
        started = time.monotonic()
        resp = self.http.get(self.controller_url + "/health", timeout=2)
        assert time.monotonic() - started < REQUEST_BOUND_S
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def admin_workers(self) -> dict[str, dict[str, Any]]:
        """The controller's view; {} while it cannot read the registry."""
        resp = self.http.get(self.controller_url + "/v1/workers", timeout=2)
        if resp.status_code == 503:
            return {}
        assert resp.status_code == 200, resp.text
        return {w["worker_id"]: w for w in resp.json()["data"]}

    def whole(self, url: str | None = None, registered_after: float = 0.0) -> bool:
        """Every worker READY in the registry (registered since `registered_after`) and
        routable through the gateway, which reports itself healthy."""
        ready = {
            wid
            for wid, w in self.admin_workers().items()
            if w["state"] == "READY" and w["registered_at"] >= registered_after
        }
        health = self.health(url)
        return (
            ready >= set(self.workers)
            and health["status"] == "ok"
            and health["models"] == {MODEL: len(self.workers)}
        )

    def chat(self, url: str | None = None, http: httpx.Client | None = None) -> Answer:
        started = time.monotonic()
        try:
            resp = (http or self.http).post(
                (url or self.gateway_url) + "/v1/chat/completions", json=CHAT, timeout=5
            )
        except httpx.HTTPError as exc:
            return Answer(0, time.monotonic() - started, "", repr(exc))
        return Answer(
            resp.status_code, time.monotonic() - started, resp.headers.get("x-vpool-worker", ""), resp.text
        )

    def diagnostics(self) -> str:
        parts = [f"--- {p.name}\n{p.log_tail()}" for p in self.procs]
        return "\n".join([*parts, f"--- redis\n{self.redis.log_tail()}"])


@dataclass(frozen=True)
class Answer:
    status: int
    elapsed_s: float
    worker: str
    body: str


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not in {timeout_s} s: {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def split() -> Iterator[SplitFleet]:
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vpool-outage-")))
        redis = stack.enter_context(running_redis())
        http = stack.enter_context(httpx.Client())
        controller_port, gateway_port = free_port(), free_port()
        config = {
            "registry": {
                "url": redis.url,
                "key_prefix": f"outage-{uuid.uuid4().hex[:8]}",
                "timeout_s": REGISTRY_TIMEOUT_S,
            },
            "controller": {
                "port": controller_port,
                "heartbeat_interval_s": HEARTBEAT_S,
                "expiry_intervals": EXPIRY_INTERVALS,
                "health_probe_timeout_s": 1.0,
            },
            "gateway": {"port": gateway_port, "refresh_interval_s": REFRESH_S, "connect_timeout_s": 1.0},
        }
        config_path = workdir / "vpool.yaml"
        config_path.write_text(yaml.safe_dump(config))
        fleet = SplitFleet(
            redis,
            f"http://127.0.0.1:{controller_port}",
            f"http://127.0.0.1:{gateway_port}",
            config_path,
            workdir,
            http,
        )
        stack.callback(fleet.stop_processes)  # after the workers stop heartbeating
        controller = fleet.spawn("controller", "controller", "--no-launch")
        gateway = fleet.spawn("gateway", "gateway")
        fleet.wait_serving(controller, fleet.controller_url)
        fleet.wait_serving(gateway, fleet.gateway_url)
        for name in WORKERS:
            fleet.workers[name] = start_fake_worker(stack, name, fleet.controller_url)
        yield fleet


@pytest.fixture
def fleet(split: SplitFleet) -> Iterator[SplitFleet]:
    """The module's fleet, whole and with Redis serving, before and after the case."""
    split.redis.ensure_serving()
    try:
        wait_for(split.whole, HEAL_TIMEOUT_S, "the fleet whole before the case")
    except AssertionError:
        pytest.fail(f"fleet not whole before the case\n{split.diagnostics()}")
    yield split
    print(split.diagnostics())  # pytest shows it for a failed case only
    split.redis.ensure_serving()


class Poller:
    """Requests through the gateway, one after another, for as long as the block lasts, and
    what the gateway said it could route each time."""

    def __init__(self, fleet: SplitFleet) -> None:
        self._fleet = fleet
        self._stop = threading.Event()
        self.answers: list[Answer] = []
        self.routable: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as http:
            while not self._stop.is_set():
                self.answers.append(self._fleet.chat(http=http))
                with contextlib.suppress(httpx.HTTPError):
                    resp = http.get(self._fleet.gateway_url + "/health", timeout=2)
                    self.routable.append(resp.json()["models"].get(MODEL, 0))
                time.sleep(0.02)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def assert_all_served(self) -> None:
        failed = [a for a in self.answers if a.status != 200]
        assert not failed, f"{len(failed)} of {len(self.answers)} failed, first: {failed[0]}"
        slowest = max(a.elapsed_s for a in self.answers)
        assert slowest < REQUEST_BOUND_S, f"a request took {slowest:.2f} s"
        assert min(self.routable) >= 1, f"the gateway had no routable worker: {self.routable}"


def metric(text: str, name: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return None


def register(fleet: SplitFleet, worker_id: str) -> httpx.Response:
    body = {"worker_id": worker_id, "url": fleet.workers["w1"].stub.url, "models": [MODEL]}
    return fleet.http.post(fleet.controller_url + "/v1/workers", json=body, timeout=5)


# --- Redis down ----------------------------------------------------------------------------------


def test_redis_down_gateway_routes_on_its_snapshot_controller_answers_503_then_fleet_heals(
    fleet: SplitFleet,
) -> None:
    fleet.redis.stop()
    wait_for(lambda: fleet.health()["registry"] == "unavailable", 3, "gateway noticing Redis is down")
    health = fleet.health()
    assert health["status"] == "degraded"
    assert health["models"] == {MODEL: 2}
    metrics = fleet.http.get(fleet.gateway_url + "/metrics").text
    assert metric(metrics, "vpool_registry_up") == 0

    # Longer than the workers' TTL: the gateway still routes to both, from its snapshot.
    deadline = time.monotonic() + TTL_S * 1.5
    answers = []
    while time.monotonic() < deadline:
        answers.append(fleet.chat())
    assert all(a.status == 200 for a in answers), answers[0]
    assert {a.worker for a in answers} == set(WORKERS)

    started = time.monotonic()
    resp = register(fleet, "newcomer")
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "registry_unavailable"
    assert time.monotonic() - started < REQUEST_BOUND_S
    wait_for(lambda: fleet.controller_health()["status"] == "degraded", 3, "controller degraded")
    assert fleet.controller_health()["registry"] == "unavailable"

    # A worker that starts during the outage is refused, keeps trying, and joins afterwards.
    with contextlib.ExitStack() as stack:
        late = start_fake_worker(stack, "w3", fleet.controller_url)
        time.sleep(HEARTBEAT_S * 2)
        restarted_at = time.time()
        fleet.redis.start()  # empty: it lost every record
        wait_for(
            lambda: {"w1", "w2", "w3"} <= set(fleet.admin_workers()),
            HEAL_TIMEOUT_S,
            "every worker registered again, the late one too",
        )
        wait_for(lambda: fleet.health()["models"] == {MODEL: 3}, 3, "gateway routing to all three")
        assert all(w["registered_at"] >= restarted_at for w in fleet.admin_workers().values())
        assert fleet.controller_health()["status"] == "ok"
        late.stop_heartbeats()
        fleet.http.delete(fleet.controller_url + "/v1/workers/w3")
        wait_for(lambda: fleet.health()["models"] == {MODEL: 2}, 3, "w3 out of routing")
    wait_for(fleet.whole, 3, "fleet whole")
    metrics = fleet.http.get(fleet.gateway_url + "/metrics").text
    assert metric(metrics, "vpool_registry_up") == 1


# --- Redis frozen --------------------------------------------------------------------------------


def test_frozen_redis_costs_requests_nothing_and_registry_calls_one_timeout(fleet: SplitFleet) -> None:
    fleet.redis.freeze()
    try:
        wait_for(lambda: fleet.health()["status"] == "degraded", 3, "gateway noticing the freeze")
        answers = [fleet.chat() for _ in range(20)]
        assert all(a.status == 200 for a in answers), answers[0]
        assert max(a.elapsed_s for a in answers) < REQUEST_BOUND_S

        for call in (
            lambda: register(fleet, "newcomer"),
            lambda: fleet.http.post(fleet.controller_url + "/v1/workers/w1/heartbeat", json={}, timeout=5),
            lambda: fleet.http.get(fleet.controller_url + "/v1/workers", timeout=5),
        ):
            started = time.monotonic()
            resp = call()
            assert resp.status_code == 503, resp.text
            assert time.monotonic() - started < REQUEST_BOUND_S  # not a hang
        assert fleet.controller_health()["status"] == "degraded"
    finally:
        fleet.redis.resume()
    wait_for(fleet.whole, HEAL_TIMEOUT_S, "fleet whole after SIGCONT")
    assert fleet.controller_health()["status"] == "ok"


def test_freeze_longer_than_the_ttl_never_leaves_the_gateway_without_a_worker(fleet: SplitFleet) -> None:
    """On SIGCONT every record has expired at once; the gateway keeps routing to the workers
    it knew while they register again."""
    with Poller(fleet) as poller:
        fleet.redis.freeze()
        try:
            time.sleep(TTL_S * 2)
        finally:
            fleet.redis.resume()
        resumed_at = time.time()
        wait_for(
            lambda: fleet.whole(registered_after=resumed_at),
            HEAL_TIMEOUT_S,
            "every worker registered again after its record expired",
        )
    poller.assert_all_served()
    assert len(poller.answers) > 20


# --- Redis restarted empty -----------------------------------------------------------------------


def test_restarted_empty_redis_is_refilled_by_heartbeats_without_restarting_anything(
    fleet: SplitFleet,
) -> None:
    with Poller(fleet) as poller:
        restarted_at = time.time()
        fleet.redis.restart()
        wait_for(
            lambda: fleet.whole(registered_after=restarted_at),
            HEAL_TIMEOUT_S,
            "every worker registered again in the new Redis",
        )
    poller.assert_all_served()


def test_external_server_registered_at_run_time_is_written_back_after_redis_restarts_empty(
    fleet: SplitFleet,
) -> None:
    """Nobody heartbeats for an external server but the controller: it must restore it."""
    with StubWorker("ext").running() as ext:
        body = {"worker_id": "ext", "url": ext.url, "models": ["ext-model"], "kind": "external"}
        assert fleet.http.post(fleet.controller_url + "/v1/workers", json=body).status_code == 201
        wait_for(lambda: "ext-model" in fleet.health()["models"], 3, "gateway routing to ext")
        fleet.redis.restart()
        wait_for(lambda: "ext" in fleet.admin_workers(), HEAL_TIMEOUT_S, "ext back in the registry")
        assert fleet.admin_workers()["ext"]["state"] == "READY"
        # The controller wrote ext back; the gateway routes to it again on a later refresh.
        wait_for(
            lambda: fleet.health()["models"].get("ext-model") == 1,
            HEAL_TIMEOUT_S,
            "gateway routing to ext again",
        )
        assert fleet.http.delete(fleet.controller_url + "/v1/workers/ext").status_code == 200
        wait_for(lambda: "ext-model" not in fleet.health()["models"], 3, "ext out of routing")


def test_gateway_started_while_redis_is_down_serves_once_it_returns(fleet: SplitFleet) -> None:
    fleet.redis.stop()
    url = f"http://127.0.0.1:{free_port()}"
    late = fleet.spawn("gateway-late", "gateway", "--port", url.rsplit(":", 1)[1])
    try:
        fleet.wait_serving(late, url)
        health = fleet.health(url)
        assert health["status"] == "degraded"
        assert health["registry"] == "unavailable"
        assert health["models"] == {}
        assert fleet.chat(url).status == 404  # it knows of no worker yet
        fleet.redis.start()
        wait_for(lambda: fleet.whole(url), HEAL_TIMEOUT_S, "late gateway routing to the fleet")
        assert fleet.chat(url).status == 200
    finally:
        late.stop()
        fleet.procs.remove(late)


# --- the pieces, on their own --------------------------------------------------------------------


async def test_every_registry_call_to_a_frozen_redis_gives_up_within_its_timeout(
    fleet: SplitFleet,
) -> None:
    registry = RedisRegistry.from_url(
        fleet.redis.url, key_prefix=f"bound-{uuid.uuid4().hex[:8]}", timeout_s=REGISTRY_TIMEOUT_S
    )
    record = WorkerRecord(worker_id="w", url="http://127.0.0.1:9", models=[MODEL], state=WorkerState.READY)
    await registry.put(record, TTL_S)  # a pooled connection, open before the freeze
    fleet.redis.freeze()
    try:
        for call in (
            lambda: registry.list_workers(),
            lambda: registry.heartbeat("w", WorkerLoad(), TTL_S),
            lambda: registry.set_state("w", WorkerState.DRAINING, TTL_S),
            lambda: registry.get("w"),
            lambda: registry.put(record, TTL_S),
            lambda: registry.remove("w"),
        ):
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable):
                await call()
            assert time.monotonic() - started < REGISTRY_TIMEOUT_S + 0.2
    finally:
        fleet.redis.resume()
        await registry.close()


class FlakyRegistry(MemoryRegistry):
    """A memory registry that can be switched off, as Redis goes away."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def list_workers(self) -> list[WorkerRecord]:
        if self.down:
            raise RegistryUnavailable("switched off")
        return await super().list_workers()


async def test_workers_the_registry_lost_stay_routable_for_one_expiry_window_only() -> None:
    registry = FlakyRegistry()
    window_s, refresh_s = 0.3, 0.05
    fleet = Fleet(registry, make_policy("round_robin"), set(), refresh_s, expiry_window_s=window_s)

    def record(worker_id: str) -> WorkerRecord:
        return WorkerRecord(
            worker_id=worker_id, url="http://127.0.0.1:9", models=[MODEL], state=WorkerState.READY
        )

    for worker_id in ("a", "b"):
        await registry.put(record(worker_id), 60)
    await fleet.refresh()
    assert fleet.ready_count(MODEL) == 2

    # Without an outage, a worker the registry no longer lists leaves at the next refresh.
    await registry.remove("b")
    await fleet.refresh()
    assert fleet.ready_count(MODEL) == 1
    await registry.put(record("b"), 60)
    await fleet.refresh()

    registry.down = True
    await fleet.refresh()
    assert not fleet.registry_ok and fleet.ready_count(MODEL) == 2
    for worker_id in ("a", "b"):  # it comes back empty
        await registry.remove(worker_id)
    registry.down = False
    await fleet.refresh()
    assert fleet.registry_ok
    assert fleet.ready_count(MODEL) == 2
    assert {w.worker_id for w in fleet.retained} == {"a", "b"}

    await registry.put(record("a"), 60)  # a registers again; b died during the outage
    await fleet.refresh()
    assert [w.worker_id for w in fleet.retained] == ["b"]
    assert fleet.ready_count(MODEL) == 2

    await asyncio.sleep(window_s + refresh_s)
    await fleet.refresh()
    assert fleet.retained == []
    assert fleet.choose(MODEL).worker_id == "a"
    assert fleet.ready_count(MODEL) == 1


async def test_a_redis_restarted_between_two_refreshes_is_an_outage_not_an_empty_fleet(
    fleet: SplitFleet,
) -> None:
    """redis-py reconnects without a word, so no call fails across a quick restart: the
    registry reads Redis's run_id and says so once, and the gateway keeps its workers."""
    registry = RedisRegistry.from_url(
        fleet.redis.url, key_prefix=f"restart-{uuid.uuid4().hex[:8]}", timeout_s=REGISTRY_TIMEOUT_S
    )
    view = Fleet(registry, make_policy("round_robin"), set(), 0.05, expiry_window_s=5.0)
    record = WorkerRecord(worker_id="w", url="http://127.0.0.1:9", models=[MODEL], state=WorkerState.READY)
    try:
        await registry.put(record, 60)
        await view.refresh()
        assert view.ready_count(MODEL) == 1
        fleet.redis.restart()
        await _reconnect(registry)
        with pytest.raises(RegistryUnavailable, match="restarted"):
            await registry.list_workers()
        assert await registry.list_workers() == []  # said once; the restarted Redis is empty

        await registry.put(record, 60)
        await view.refresh()
        fleet.redis.restart()
        await _reconnect(registry)
        await view.refresh()  # the restart, seen as an outage: the snapshot stays
        assert not view.registry_ok and view.ready_count(MODEL) == 1
        await view.refresh()  # back, empty: w stays routable while it registers again
        assert view.registry_ok and view.ready_count(MODEL) == 1
        assert [w.worker_id for w in view.retained] == ["w"]
    finally:
        await registry.close()


async def _reconnect(registry: RedisRegistry) -> None:
    """Some other call meets the closed connection first (at most one fails), as a
    worker's heartbeat or the gateway's announcement may; the pool is on the new server."""
    with contextlib.suppress(RegistryUnavailable):
        await registry.get("w")  # may meet the connection the restart closed
    await registry.get("w")
