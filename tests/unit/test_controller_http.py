"""The controller's HTTP API over a real socket, with stub workers to probe."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.support.stub_worker import StubWorker, closed_port
from tests.unit.conftest import StubFactory, assert_openai_error
from tests.unit.controllers import HEARTBEAT_S, TOKEN, ControllerFactory, ControllerHandle
from vpool.config import EndpointSpec
from vpool.controller.external import endpoint_worker_id
from vpool.registry.redis_backend import RedisRegistry


def registration(stub_url: str, worker_id: str = "w1", **fields: Any) -> dict[str, Any]:
    return {"worker_id": worker_id, "url": stub_url, "models": ["tiny-chat"], **fields}


def workers(http: httpx.Client, url: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    resp = http.get(url + "/v1/workers", **kwargs)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list"
    return {w["worker_id"]: w for w in body["data"]}


def wait_for(check: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- registration -------------------------------------------------------------------------------


def test_registered_worker_is_ready_in_the_admin_view(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    before = time.time()
    resp = http.post(
        controller.url + "/v1/workers", json=registration(stub.url + "/", tensor_parallel_size=2)
    )
    assert resp.status_code == 201, resp.text
    accepted = resp.json()
    assert accepted["worker_id"] == "w1"
    assert accepted["heartbeat_interval_s"] == HEARTBEAT_S
    assert accepted["ttl_s"] == pytest.approx(HEARTBEAT_S * 3)
    w = workers(http, controller.url)["w1"]
    assert w["state"] == "READY"
    assert w["models"] == ["tiny-chat"]
    assert w["url"] == stub.url  # trailing slash dropped
    assert w["tensor_parallel_size"] == 2
    assert w["kind"] == "vpool"
    assert w["last_heartbeat"] >= before
    assert w["load"] == {
        "running": 0, "waiting": 0, "kv_cache_usage": 0.0, "prefix_cache_queries": 0, "prefix_cache_hits": 0
    }  # fmt: skip


@pytest.mark.parametrize("failure", ["refused", "unhealthy"])
def test_worker_failing_its_health_probe_is_refused_and_not_registered(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client, failure: str
) -> None:
    if failure == "refused":
        url = f"http://127.0.0.1:{closed_port()}"
    else:
        url, stub.healthy = stub.url, False
    resp = http.post(controller.url + "/v1/workers", json=registration(url))
    error = assert_openai_error(resp, 400)
    assert error["code"] == "health_probe_failed"
    assert error["param"] == "url"
    assert workers(http, controller.url) == {}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"worker_id": "w1", "models": ["m"]}, "url", id="missing-url"),
        pytest.param({"worker_id": "w1", "url": "ftp://x", "models": ["m"]}, "url", id="not-http"),
        pytest.param({"worker_id": "w 1", "url": "http://x", "models": ["m"]}, "worker_id", id="bad-id"),
        pytest.param({"worker_id": "w1", "url": "http://x", "models": []}, "models", id="no-models"),
        pytest.param(
            {"worker_id": "w1", "url": "http://x", "models": ["m"], "tensor_parallel_size": 0},
            "tensor_parallel_size",
            id="zero-tp",
        ),
    ],
)
def test_invalid_registration_is_400_openai_error(
    controller: ControllerHandle, http: httpx.Client, body: dict[str, Any], param: str
) -> None:
    resp = http.post(controller.url + "/v1/workers", json=body)
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "detail" not in resp.json()


def test_registration_that_is_not_json_is_400_openai_error(
    controller: ControllerHandle, http: httpx.Client
) -> None:
    resp = http.post(
        controller.url + "/v1/workers", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(resp, 400)


# --- heartbeats, drain, deregistration ----------------------------------------------------------


def test_heartbeat_updates_the_load_in_the_admin_view(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    assert http.post(controller.url + "/v1/workers", json=registration(stub.url)).status_code == 201
    first = workers(http, controller.url)["w1"]["last_heartbeat"]
    load = {
        "running": 3,
        "waiting": 7,
        "kv_cache_usage": 0.5,
        "prefix_cache_queries": 900,
        "prefix_cache_hits": 640,
    }
    resp = http.post(controller.url + "/v1/workers/w1/heartbeat", json=load)
    assert resp.status_code == 200, resp.text
    assert resp.json()["load"] == load
    w = workers(http, controller.url)["w1"]
    assert w["load"] == load
    assert w["last_heartbeat"] >= first


def test_a_heartbeat_without_prefix_cache_counters_still_counts_as_reporting_none(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    """A worker from before the counters (or one that cannot read them) keeps heartbeating."""
    assert http.post(controller.url + "/v1/workers", json=registration(stub.url)).status_code == 201
    resp = http.post(controller.url + "/v1/workers/w1/heartbeat", json={"running": 1})
    assert resp.status_code == 200, resp.text
    load = workers(http, controller.url)["w1"]["load"]
    assert (load["running"], load["prefix_cache_queries"], load["prefix_cache_hits"]) == (1, 0, 0)
    bad = http.post(controller.url + "/v1/workers/w1/heartbeat", json={"prefix_cache_hits": -1})
    assert assert_openai_error(bad, 400)["param"] == "prefix_cache_hits"


def test_heartbeat_of_an_unknown_worker_is_404_so_it_registers_again(
    controller: ControllerHandle, http: httpx.Client
) -> None:
    resp = http.post(controller.url + "/v1/workers/nobody/heartbeat", json={"running": 0})
    error = assert_openai_error(resp, 404)
    assert error["code"] == "worker_not_found"
    assert "nobody" in error["message"]


def test_heartbeat_with_an_impossible_load_is_400_openai_error(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    assert http.post(controller.url + "/v1/workers", json=registration(stub.url)).status_code == 201
    resp = http.post(controller.url + "/v1/workers/w1/heartbeat", json={"waiting": -1})
    error = assert_openai_error(resp, 400)
    assert error["param"] == "waiting"


def test_worker_missing_its_heartbeats_leaves_the_fleet(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    assert http.post(controller.url + "/v1/workers", json=registration(stub.url)).status_code == 201
    time.sleep(controller.settings.worker_ttl_s + 0.1)
    assert workers(http, controller.url) == {}
    assert_openai_error(http.post(controller.url + "/v1/workers/w1/heartbeat", json={}), 404)


def test_drain_then_delete_moves_a_worker_to_draining_then_gone(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    assert http.post(controller.url + "/v1/workers", json=registration(stub.url)).status_code == 201
    drained = http.post(controller.url + "/v1/workers/w1/drain")
    assert drained.status_code == 200 and drained.json()["state"] == "DRAINING"
    # A draining worker stops heartbeating but stays listed beyond the usual TTL.
    time.sleep(controller.settings.worker_ttl_s + 0.1)
    assert workers(http, controller.url)["w1"]["state"] == "DRAINING"
    gone = http.delete(controller.url + "/v1/workers/w1")
    assert gone.status_code == 200 and gone.json()["state"] == "GONE"
    assert workers(http, controller.url)["w1"]["state"] == "GONE"


@pytest.mark.parametrize(("method", "path"), [("POST", "/drain"), ("DELETE", "")])
def test_drain_or_delete_of_an_unknown_worker_is_404_openai_error(
    controller: ControllerHandle, http: httpx.Client, method: str, path: str
) -> None:
    error = assert_openai_error(http.request(method, controller.url + "/v1/workers/nobody" + path), 404)
    assert error["code"] == "worker_not_found"


# --- the registration token ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", TOKEN], ids=["missing", "wrong", "not-bearer"]
)
def test_registration_token_is_required_when_configured(
    start_controller: ControllerFactory, stub: StubWorker, http: httpx.Client, authorization: str | None
) -> None:
    ctl = start_controller(token=TOKEN)
    headers = {"authorization": authorization} if authorization else {}
    for resp in (
        http.post(ctl.url + "/v1/workers", json=registration(stub.url), headers=headers),
        http.get(ctl.url + "/v1/workers", headers=headers),
        http.post(ctl.url + "/v1/workers/w1/heartbeat", json={}, headers=headers),
    ):
        assert_openai_error(resp, 401)
    assert workers(http, ctl.url, headers={"authorization": f"Bearer {TOKEN}"}) == {}


def test_right_registration_token_is_accepted(
    start_controller: ControllerFactory, stub: StubWorker, http: httpx.Client
) -> None:
    ctl = start_controller(token=TOKEN)
    headers = {"authorization": f"Bearer {TOKEN}"}
    resp = http.post(ctl.url + "/v1/workers", json=registration(stub.url), headers=headers)
    assert resp.status_code == 201, resp.text
    assert http.post(ctl.url + "/v1/workers/w1/heartbeat", json={}, headers=headers).status_code == 200
    assert workers(http, ctl.url, headers=headers)["w1"]["state"] == "READY"


# --- external servers ----------------------------------------------------------------------------


def test_static_endpoint_becomes_ready_then_failed_when_it_stops(
    start_controller: ControllerFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    stub = start_stub("vllm-serve")
    ctl = start_controller(endpoints=[EndpointSpec(url=stub.url, models=["ext-model"])])
    worker_id = endpoint_worker_id(stub.url)

    def state() -> str | None:
        w = workers(http, ctl.url).get(worker_id)
        return None if w is None else w["state"]

    wait_for(lambda: state() == "READY", timeout_s=3 * HEARTBEAT_S + 1)
    w = workers(http, ctl.url)[worker_id]
    assert w["kind"] == "external"
    assert w["models"] == ["ext-model"]
    assert w["url"] == stub.url
    stub.stop()
    wait_for(lambda: state() == "FAILED", timeout_s=3 * HEARTBEAT_S + 1)


def test_static_endpoint_comes_back_by_itself_when_healthy_again(
    start_controller: ControllerFactory, stub: StubWorker, http: httpx.Client
) -> None:
    stub.healthy = False
    ctl = start_controller(endpoints=[EndpointSpec(url=stub.url, models=["ext-model"])])
    worker_id = endpoint_worker_id(stub.url)
    wait_for(lambda: workers(http, ctl.url).get(worker_id, {}).get("state") == "FAILED")
    stub.healthy = True
    wait_for(lambda: workers(http, ctl.url)[worker_id]["state"] == "READY")


def test_external_server_registered_through_the_api_is_kept_alive_by_probes(
    start_controller: ControllerFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    ctl = start_controller(heartbeat_s=0.1)
    server = start_stub("sglang")
    ext = http.post(ctl.url + "/v1/workers", json=registration(server.url, "ext", kind="external"))
    plain = http.post(ctl.url + "/v1/workers", json=registration(server.url, "plain"))
    assert (ext.status_code, plain.status_code) == (201, 201)
    registered = workers(http, ctl.url)["ext"]["last_heartbeat"]
    time.sleep(ctl.settings.worker_ttl_s * 2)
    fleet = workers(http, ctl.url)
    assert "plain" not in fleet  # nobody heartbeats for a vpool worker
    assert fleet["ext"]["state"] == "READY"
    assert fleet["ext"]["kind"] == "external"
    assert fleet["ext"]["last_heartbeat"] > registered  # the controller heartbeats for it
    server.healthy = False
    wait_for(lambda: workers(http, ctl.url)["ext"]["state"] == "FAILED")


# --- registry outage -----------------------------------------------------------------------------


def test_registration_is_503_openai_error_while_the_registry_is_down(
    start_controller: ControllerFactory, stub: StubWorker, http: httpx.Client
) -> None:
    down = RedisRegistry.from_url(
        "redis://127.0.0.1:1/0", key_prefix=f"vpool-test-{uuid.uuid4().hex}", timeout_s=0.2
    )
    ctl = start_controller(registry=down)
    error = assert_openai_error(http.post(ctl.url + "/v1/workers", json=registration(stub.url)), 503)
    assert error["code"] == "registry_unavailable"
    assert_openai_error(http.get(ctl.url + "/v1/workers"), 503)
    assert_openai_error(http.post(ctl.url + "/v1/workers/w1/heartbeat", json={}), 503)
    assert http.get(ctl.url + "/health").status_code == 200
