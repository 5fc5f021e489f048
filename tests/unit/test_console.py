"""The web console: its pages come from the package and nowhere else, and `/ui/api/fleet`
(what the fleet page polls) is behind the API key, tells what the gateway sees, and keeps
answering while the registry is away. The pages themselves run in a real browser in
tests/integration/test_console_browser.py."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.stub_worker import StubWorker
from tests.unit.conftest import (
    API_KEY,
    MODEL,
    REFRESH_S,
    GatewayFactory,
    GatewayHandle,
    Servers,
    assert_openai_error,
)
from vpool.config import GatewaySettings, Settings
from vpool.gateway.app import create_app
from vpool.gateway.console import STATIC_DIR
from vpool.gateway.server import gateway_server
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.records import JobRecord, JobState, WorkerLoad, WorkerRecord, WorkerState

FLEET = "/ui/api/fleet"
URL = re.compile(rb"(?:https?:)?//[A-Za-z0-9.-]+", re.IGNORECASE)


def _job(job_id: str, **fields: Any) -> JobRecord:
    return JobRecord(job_id=job_id, launcher="slurm", model=MODEL, **fields)


# --- the pages ---------------------------------------------------------------------------


def test_the_console_files_name_no_other_host() -> None:
    files = sorted(p for p in STATIC_DIR.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"index.html", "console.js", "console.css"}
    for path in files:
        assert not URL.findall(path.read_bytes()), f"{path.name} loads from elsewhere"


def test_ui_serves_the_page_and_every_file_it_loads_with_no_key(
    start_gateway: GatewayFactory, http: httpx.Client
) -> None:
    gateway = start_gateway(api_keys=[API_KEY])
    bare = http.get(gateway.url + "/ui")
    assert bare.status_code == 308 and bare.headers["location"] == "ui/"  # relative: prefix-proof
    page = http.get(gateway.url + "/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # The browser is told to load nothing from anywhere else, too.
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    loaded = re.findall(r'(?:src|href)="([^"#][^"]*)"', page.text)
    assert set(loaded) >= {"console.js", "console.css"}
    for name in loaded:
        if name.startswith("data:"):
            continue
        asset = http.get(f"{gateway.url}/ui/{name}")
        assert asset.status_code == 200, name
        assert not URL.findall(asset.content), name
    assert http.get(gateway.url + "/ui/console.js").headers["content-type"].startswith("text/javascript")


def test_an_unknown_console_path_is_a_404_in_the_openai_shape(
    gateway: GatewayHandle, http: httpx.Client
) -> None:
    assert_openai_error(http.get(gateway.url + "/ui/no-such-page.html"), 404)
    # Encoded, so the client sends it as is and the file server sees `../console.py`.
    assert_openai_error(http.get(gateway.url + "/ui/..%2fconsole.py"), 404)


def test_the_schema_lists_the_fleet_api_but_not_the_pages(gateway: GatewayHandle, http: httpx.Client) -> None:
    paths = http.get(gateway.url + "/openapi.json").json()["paths"]
    assert FLEET in paths
    assert not [p for p in paths if p.startswith("/ui") and p != FLEET]


# --- the fleet API -----------------------------------------------------------------------


def test_the_fleet_api_needs_the_key_when_keys_are_set(
    start_gateway: GatewayFactory, http: httpx.Client
) -> None:
    gateway = start_gateway(api_keys=[API_KEY])
    assert assert_openai_error(http.get(gateway.url + FLEET), 401)["code"] == "invalid_api_key"
    wrong = http.get(gateway.url + FLEET, headers={"Authorization": "Bearer sk-wrong"})
    assert "Incorrect API key" in assert_openai_error(wrong, 401)["message"]
    good = http.get(gateway.url + FLEET, headers={"Authorization": f"Bearer {API_KEY}"})
    assert good.status_code == 200 and good.json()["registry"] == "ok"


def test_the_fleet_api_lists_models_workers_and_jobs(gateway: GatewayHandle, http: httpx.Client) -> None:
    busy = WorkerRecord(
        worker_id="busy-1", url="http://10.0.0.9:8000", models=["other-model"], state=WorkerState.FAILED,
        load=WorkerLoad(running=3, waiting=2, kv_cache_usage=0.75), max_model_len=2048,
        last_heartbeat=time.time() - 5, kind="external",
    )  # fmt: skip
    gateway.server.call(gateway.registry.put(busy, 300))
    gateway.refresh()
    gateway.server.call(gateway.registry.put_job(_job("job-1", state=JobState.PENDING, reason="Resources")))
    gateway.server.call(gateway.registry.put_job(_job("job-2", state=JobState.READY, worker_ids=["stub-1"])))

    view = http.get(gateway.url + FLEET).json()

    assert view["registry"] == "ok"
    models = {m["name"]: m for m in view["models"]}
    assert models[MODEL] == {"name": MODEL, "ready_workers": 1, "workers": 1, "max_model_len": None,
                             "runner": "generate"}  # fmt: skip
    # A model whose only worker failed is still shown, with nothing ready.
    assert models["other-model"]["ready_workers"] == 0 and models["other-model"]["workers"] == 1
    workers = {w["worker_id"]: w for w in view["workers"]}
    assert len(workers) == 2 and workers.keys() - {"busy-1"}  # and the stub
    failed = workers["busy-1"]
    assert failed["state"] == "FAILED" and failed["kind"] == "external"
    assert (failed["running"], failed["waiting"], failed["kv_cache_usage"]) == (3, 2, 0.75)
    assert 4.5 < failed["last_heartbeat_age_s"] < 60
    # What a worker is reached at stays between the gateway and the registry.
    assert "url" not in failed and "10.0.0.9" not in str(view)
    jobs = {j["job_id"]: j for j in view["jobs"]}
    assert jobs["job-1"]["state"] == "PENDING" and jobs["job-1"]["reason"] == "Resources"
    assert jobs["job-1"]["launcher"] == "slurm" and jobs["job-1"]["model"] == MODEL
    assert jobs["job-2"]["state"] == "READY" and jobs["job-2"]["worker_ids"] == ["stub-1"]
    for job_id in ("job-1", "job-2"):
        gateway.server.call(gateway.registry.remove_job(job_id))


def test_the_fleet_api_gives_each_workers_prefix_cache_hit_rate(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    gateway.clear()
    gateway.add_worker(stub, worker_id="warm", prefix_cache_queries=6150, prefix_cache_hits=3968)
    gateway.add_worker(stub, worker_id="cold")  # looked nothing up: caching off, or no traffic yet
    workers = {w["worker_id"]: w for w in http.get(gateway.url + FLEET).json()["workers"]}
    warm, cold = workers["warm"], workers["cold"]
    assert (warm["prefix_cache_hits"], warm["prefix_cache_queries"]) == (3968, 6150)
    assert warm["prefix_cache_hit_rate"] == round(3968 / 6150, 4)
    # No lookups is no rate (the page shows a dash), not a 0 % hit rate.
    assert (cold["prefix_cache_queries"], cold["prefix_cache_hit_rate"]) == (0, None)


def test_the_fleet_api_counts_this_gateways_requests_in_flight(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    stub.hold = threading.Event()
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    answered: list[int] = []
    caller = threading.Thread(
        target=lambda: answered.append(http.post(gateway.url + "/v1/chat/completions", json=chat).status_code)
    )
    caller.start()
    try:
        deadline = time.monotonic() + 5
        while stub.count == 0:
            assert time.monotonic() < deadline, "the request never reached the stub"
            time.sleep(0.01)
        (worker,) = http.get(gateway.url + FLEET).json()["workers"]
        assert worker["inflight"] == 1
    finally:
        stub.hold.set()
        caller.join(10)
    assert answered == [200]
    (worker,) = http.get(gateway.url + FLEET).json()["workers"]
    assert worker["inflight"] == 0


def test_the_fleet_api_with_no_workers_lists_the_catalog(
    start_gateway: GatewayFactory, http: httpx.Client
) -> None:
    gateway = start_gateway(catalog=["planned-model"])
    view = http.get(gateway.url + FLEET).json()
    assert view["workers"] == [] and view["jobs"] == []
    assert view["models"] == [
        {"name": "planned-model", "ready_workers": 0, "workers": 0, "max_model_len": None, "runner": None}
    ]


# --- registry outages --------------------------------------------------------------------


class SwitchableRegistry(MemoryRegistry):
    """A memory registry whose worker listing, or job listing, can be switched off."""

    def __init__(self) -> None:
        super().__init__()
        self.workers_down = False
        self.jobs_down = False

    async def list_workers(self) -> list[WorkerRecord]:
        if self.workers_down:
            raise RegistryUnavailable("switched off")
        return await super().list_workers()

    async def list_jobs(self) -> list[JobRecord]:
        if self.jobs_down:
            raise RegistryUnavailable("switched off")
        return await super().list_jobs()


@pytest.fixture
def outage_gateway(servers: Servers, stub: StubWorker) -> Iterator[tuple[GatewayHandle, SwitchableRegistry]]:
    import itertools

    settings = Settings(gateway=GatewaySettings(refresh_interval_s=REFRESH_S))
    registry = SwitchableRegistry()
    app = create_app(settings, registry)
    server = servers.serve(
        app, server_factory=lambda a, host, port: gateway_server(a, settings.gateway, host, port)
    )
    gateway = GatewayHandle(server.url, app, registry, server, itertools.count(1))
    gateway.add_worker(stub, worker_id="kept-1")
    gateway.server.call(registry.put_job(_job("job-1")))
    yield gateway, registry


def _wait_for(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(REFRESH_S)


def test_the_fleet_api_answers_from_the_last_view_while_the_registry_is_away(
    outage_gateway: tuple[GatewayHandle, SwitchableRegistry], http: httpx.Client
) -> None:
    gateway, registry = outage_gateway
    assert [j["job_id"] for j in http.get(gateway.url + FLEET).json()["jobs"]] == ["job-1"]
    registry.workers_down = registry.jobs_down = True
    _wait_for(lambda: not gateway.state.fleet.registry_ok)

    resp = http.get(gateway.url + FLEET)

    assert resp.status_code == 200
    view = resp.json()
    assert view["registry"] == "unavailable"
    assert view["jobs"] == []
    assert [(w["worker_id"], w["state"]) for w in view["workers"]] == [("kept-1", "READY")]
    assert view["models"][0]["ready_workers"] == 1

    registry.workers_down = registry.jobs_down = False
    _wait_for(lambda: gateway.state.fleet.registry_ok)
    view = http.get(gateway.url + FLEET).json()
    assert view["registry"] == "ok" and [j["job_id"] for j in view["jobs"]] == ["job-1"]


def test_the_fleet_api_lists_the_workers_when_only_the_jobs_cannot_be_read(
    outage_gateway: tuple[GatewayHandle, SwitchableRegistry], http: httpx.Client
) -> None:
    gateway, registry = outage_gateway
    registry.jobs_down = True
    resp = http.get(gateway.url + FLEET)
    assert resp.status_code == 200
    view = resp.json()
    assert view["registry"] == "unavailable" and view["jobs"] == []
    assert [w["worker_id"] for w in view["workers"]] == ["kept-1"]


def test_the_fleet_api_marks_the_ejected_worker_and_only_it(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    gateway.clear()
    gateway.add_worker(stub, worker_id="healthy", max_model_len=4096)
    gateway.add_worker(stub, worker_id="failing", max_model_len=4096)
    ejector = gateway.state.fleet.ejector

    async def fail_until_ejected() -> bool:
        return [ejector.failed("failing") for _ in range(ejector.after_failures)][-1]

    assert gateway.server.call(fail_until_ejected())
    view = http.get(gateway.url + FLEET).json()
    workers = {w["worker_id"]: w for w in view["workers"]}
    assert (workers["failing"]["ejected"], workers["healthy"]["ejected"]) == (True, False)
    # Neither was lost by the registry, and no request of this gateway is on either.
    assert [(w["retained"], w["inflight"]) for w in workers.values()] == [(False, 0), (False, 0)]
    (model,) = [m for m in view["models"] if m["name"] == MODEL]
    assert model["max_model_len"] == 4096
    assert 0 <= view["last_refresh_age_s"] < 5
    gateway.clear()
