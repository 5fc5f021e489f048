"""Prometheus discovery: the controller's `/v1/targets` (http_sd format) and `/metrics`, and
gateways announcing themselves so that discovery finds them."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stub_worker import StubWorker
from tests.unit.conftest import GatewayFactory, Servers, assert_openai_error
from tests.unit.controllers import TOKEN, ControllerFactory, ControllerHandle
from tests.unit.test_controller_http import registration
from vpool.config import GatewaySettings
from vpool.gateway.announce import Announcer, advertised_url
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.records import WorkerRecord, WorkerState
from vpool.registry.redis_backend import RedisRegistry

AUTH = {"authorization": f"Bearer {TOKEN}"}


def targets(http: httpx.Client, ctl: ControllerHandle, **kwargs: object) -> list[dict[str, object]]:
    resp = http.get(ctl.url + "/v1/targets", **kwargs)  # type: ignore[arg-type]
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert isinstance(body, list)
    return body


def put(ctl: ControllerHandle, record: WorkerRecord, ttl_s: float = 60.0) -> None:
    ctl.server.call(ctl.registry.put(record, ttl_s))


def announce(ctl: ControllerHandle, url: str, ttl_s: float = 60.0) -> None:
    ctl.server.call(ctl.registry.announce_gateway(url, ttl_s))


def test_targets_list_every_announced_gateway_and_registered_worker_with_their_labels(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    assert http.post(controller.url + "/v1/workers", json=registration(stub.url, "w1")).status_code == 201
    # A worker behind a path prefix and TLS (an external server), and one on IPv6.
    put(controller, WorkerRecord(worker_id="e2", url="https://vllm.internal/team-a", models=["ext", "alias"]))
    put(
        controller,
        WorkerRecord(worker_id="m3", url="http://[fd00::7]:9100", models=["minilm"], runner="pooling"),
    )
    announce(controller, "http://gw-2:8000")
    announce(controller, "http://gw-1:8000")
    stub_address = stub.url.removeprefix("http://")
    assert targets(http, controller) == [
        group("gw-1:8000", vpool_role="gateway"),
        group("gw-2:8000", vpool_role="gateway"),
        group("vllm.internal:443", "https", "/team-a/metrics", **worker("e2", "ext")),
        group("[fd00::7]:9100", **worker("m3", "minilm", "pooling")),
        group(stub_address, **worker("w1", "tiny-chat")),
    ]


def group(address: str, scheme: str = "http", path: str = "/metrics", **labels: str) -> dict[str, Any]:
    return {"targets": [address], "labels": {**labels, "__scheme__": scheme, "__metrics_path__": path}}


def worker(worker_id: str, model: str, runner: str = "generate") -> dict[str, str]:
    return {
        "vpool_role": "worker",
        "vpool_worker_id": worker_id,
        "vpool_model": model,
        "vpool_runner": runner,
    }


def test_targets_of_an_empty_fleet_is_an_empty_list(controller: ControllerHandle, http: httpx.Client) -> None:
    assert targets(http, controller) == []


def test_a_gone_worker_and_a_draining_one_are_told_apart_in_targets(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    for worker_id in ("leaving", "draining"):
        assert (
            http.post(controller.url + "/v1/workers", json=registration(stub.url, worker_id)).status_code
            == 201
        )
    assert (
        http.delete(controller.url + "/v1/workers/leaving").status_code == 200
    )  # GONE, still listed a minute
    assert http.post(controller.url + "/v1/workers/draining/drain").status_code == 200
    ids = [t["labels"]["vpool_worker_id"] for t in targets(http, controller)]  # type: ignore[index]
    assert ids == ["draining"]  # it still serves (and counts) until it stops


def test_targets_drop_gateways_and_workers_whose_ttl_ran_out(
    controller: ControllerHandle, http: httpx.Client
) -> None:
    put(controller, WorkerRecord(worker_id="dies", url="http://10.0.0.1:9000", models=["m"]), ttl_s=0.3)
    put(controller, WorkerRecord(worker_id="lives", url="http://10.0.0.2:9000", models=["m"]), ttl_s=60)
    announce(controller, "http://gw-dies:8000", ttl_s=0.3)
    announce(controller, "http://gw-lives:8000", ttl_s=60)
    assert len(targets(http, controller)) == 4
    time.sleep(0.5)
    assert [t["targets"] for t in targets(http, controller)] == [["gw-lives:8000"], ["10.0.0.2:9000"]]


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token", TOKEN], ids=["missing", "wrong", "not-bearer"]
)
def test_targets_and_metrics_need_the_registration_token_when_one_is_set(
    start_controller: ControllerFactory, http: httpx.Client, authorization: str | None
) -> None:
    ctl = start_controller(token=TOKEN)
    announce(ctl, "http://gw-1:8000")
    headers = {"authorization": authorization} if authorization else {}
    assert_openai_error(http.get(ctl.url + "/v1/targets", headers=headers), 401)
    assert_openai_error(http.get(ctl.url + "/metrics", headers=headers), 401)
    assert [t["targets"] for t in targets(http, ctl, headers=AUTH)] == [["gw-1:8000"]]
    assert http.get(ctl.url + "/metrics", headers=AUTH).status_code == 200


def test_targets_are_503_openai_error_while_the_registry_is_down_and_metrics_say_so(
    start_controller: ControllerFactory, http: httpx.Client
) -> None:
    down = RedisRegistry.from_url(
        "redis://127.0.0.1:1/0", key_prefix=f"vpool-test-{uuid.uuid4().hex}", timeout_s=0.2
    )
    ctl = start_controller(registry=down)
    error = assert_openai_error(http.get(ctl.url + "/v1/targets"), 503)
    assert error["code"] == "registry_unavailable"
    resp = http.get(ctl.url + "/metrics")
    assert resp.status_code == 200
    samples = _samples(resp.text)
    assert samples["vpool_controller_registry_up"] == 0
    assert samples["vpool_controller_registry_failures_total"] >= 2


def test_controller_metrics_count_workers_per_model_and_state_and_gateways(
    controller: ControllerHandle, stub: StubWorker, http: httpx.Client
) -> None:
    for worker_id in ("a", "b", "c"):
        assert (
            http.post(controller.url + "/v1/workers", json=registration(stub.url, worker_id)).status_code
            == 201
        )
    assert http.post(controller.url + "/v1/workers/c/drain").status_code == 200
    put(
        controller,
        WorkerRecord(worker_id="e", url="http://10.0.0.3:9000", models=["minilm"], state=WorkerState.READY),
    )
    announce(controller, "http://gw-1:8000")
    resp = http.get(controller.url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = _samples(resp.text)
    assert samples['vpool_controller_workers{model="tiny-chat",state="READY"}'] == 2
    assert samples['vpool_controller_workers{model="tiny-chat",state="DRAINING"}'] == 1
    assert samples['vpool_controller_workers{model="minilm",state="READY"}'] == 1
    assert samples["vpool_controller_gateways"] == 1
    assert samples["vpool_controller_registry_up"] == 1


def _samples(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(
                f'{k}="{v}"' for k, v in sorted(s.labels.items(), key=lambda kv: kv[0] != "model")
            )
            found[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return found


# --- gateways announcing themselves ----------------------------------------------------------------


def test_a_gateway_announces_its_advertise_url_while_it_runs_and_withdraws_it_when_it_stops(
    servers: Servers, start_gateway: GatewayFactory
) -> None:
    gateway = start_gateway(advertise_url="http://gw.example:8000/")
    registry = gateway.registry
    listed = gateway.server.call(registry.list_gateways())
    assert [g.url for g in listed] == ["http://gw.example:8000"]
    gateway.server.stop()
    assert asyncio.run(_urls(registry)) == []  # the server's loop is gone: nothing else touches it


def test_a_gateway_renews_its_announcement_from_its_refresh_loop(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(advertise_url="http://gw.example:8000")
    # Due every 50 ms instead of every 5 s: the refresh loop (every 50 ms here) must renew it.
    gateway.state.fleet.announcer = Announcer(gateway.registry, "http://gw.example:8000", interval_s=0.05)
    first = gateway.server.call(gateway.registry.list_gateways())[0].announced_at
    deadline = time.monotonic() + 3
    while gateway.server.call(gateway.registry.list_gateways())[0].announced_at == first:
        assert time.monotonic() < deadline, "the refresh loop never announced again"
        time.sleep(0.02)


async def _urls(registry: MemoryRegistry) -> list[str]:
    return [g.url for g in await registry.list_gateways()]


@pytest.mark.parametrize(
    ("settings", "url"),
    [
        (GatewaySettings(host="10.1.2.3", port=8000, api_keys=["sk-x"]), "http://10.1.2.3:8000"),
        (GatewaySettings(host="::1", port=8000), "http://[::1]:8000"),
        (GatewaySettings(host="127.0.0.1", port=0), None),
        (
            GatewaySettings(host="127.0.0.1", port=0, advertise_url="https://gw.example/v"),
            "https://gw.example/v",
        ),
    ],
)
def test_the_advertised_url_defaults_to_the_bound_address(settings: GatewaySettings, url: str | None) -> None:
    assert advertised_url(settings) == url


def test_a_gateway_bound_to_every_address_advertises_this_hosts_name() -> None:
    import socket

    url = advertised_url(GatewaySettings(host="0.0.0.0", port=8000, api_keys=["sk-x"]))
    assert url == f"http://{socket.getfqdn()}:8000"


def test_an_advertise_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ValueError, match="advertise_url"):
        GatewaySettings(advertise_url="gw.example:8000")
