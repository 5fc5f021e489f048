"""vLLM's whole API through the gateway, its FastAPI side, and its docs, over stub workers.

Every data route forwards the client's bytes to a worker of the named model; follow-ups on
a stored response reach the worker that holds it, from any gateway; `/v1/models` and
`models.retrieve` say what is served and with what context; `/openapi.json` describes it
all; a team's own middleware wraps the data routes too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.support.stub_worker import StubWorker
from tests.unit.conftest import (
    MODEL,
    GatewayFactory,
    GatewayHandle,
    StubFactory,
    assert_openai_error,
)
from vpool.gateway.data_routes import MODEL_ROUTES
from vpool.gateway.upstream import Origin
from vpool.registry.records import WorkerRecord


def _body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


# --- every data route -------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(MODEL_ROUTES))
def test_every_data_route_reaches_a_worker_of_the_model_with_the_clients_bytes(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client, path: str
) -> None:
    body = b'{"model": "%b",   "input": "spaced as the client wrote it"}' % MODEL.encode()
    resp = http.post(gateway.url + path + "?user=q", content=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-vpool-worker"].startswith("stub-")
    (received,) = stub.received
    assert received.path == path
    assert received.body == body
    assert received.query == "user=q"


@pytest.mark.parametrize("path", ["/tokenize", "/v1/rerank", "/v2/embed"])
def test_a_data_route_for_an_unknown_model_is_404_and_reaches_no_worker(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client, path: str
) -> None:
    error = assert_openai_error(http.post(gateway.url + path, content=_body(model="nope")), 404)
    assert error["code"] == "model_not_found"
    assert stub.count == 0


@pytest.mark.parametrize("path", ["/score", "/detokenize"])
def test_a_data_route_asked_with_get_is_405_naming_post(
    gateway: GatewayHandle, http: httpx.Client, path: str
) -> None:
    resp = http.get(gateway.url + path)
    assert_openai_error(resp, 405)
    assert resp.headers["allow"] == "POST"


# --- models -----------------------------------------------------------------------------------


def test_models_carry_the_context_length_their_workers_report(
    gateway: GatewayHandle, start_stub: StubFactory, http: httpx.Client
) -> None:
    gateway.add_worker(start_stub("long"), ["sized"], max_model_len=8192)
    gateway.add_worker(start_stub("short"), ["sized"], max_model_len=4096)
    listed = {m["id"]: m for m in http.get(gateway.url + "/v1/models").json()["data"]}
    assert listed["sized"]["max_model_len"] == 4096  # what every one of its workers takes
    assert "max_model_len" not in listed[MODEL]  # its worker says nothing


def test_sdk_retrieves_a_served_model_and_raises_not_found_for_another(gateway: GatewayHandle) -> None:
    gateway.add_worker(gateway.url, ["org/with-a-slash"], max_model_len=2048)  # never called
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0) as client:
        model = client.models.retrieve(MODEL)
        assert (model.id, model.object, model.owned_by) == (MODEL, "model", "vpool")
        assert client.models.retrieve("org/with-a-slash").model_extra == {"max_model_len": 2048}
        with pytest.raises(openai.NotFoundError) as caught:
            client.models.retrieve("no-such-model")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


# --- stored responses -------------------------------------------------------------------------


def _two_holders(gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory) -> StubWorker:
    other = start_stub("other")
    gateway.add_worker(other)
    return other


def _served_by(resp: httpx.Response) -> str:
    assert resp.status_code == 200, resp.text
    served: str = resp.json()["served_by"]
    return served


def test_follow_ups_reach_the_worker_holding_the_response(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory, http: httpx.Client
) -> None:
    other = _two_holders(gateway, stub, start_stub)
    made = http.post(gateway.url + "/v1/responses", content=_body(input="hi")).json()
    holder = made["served_by"]
    for _ in range(6):  # routing alone would send some of these to the other worker
        assert _served_by(http.get(gateway.url + f"/v1/responses/{made['id']}")) == holder
        follow = http.post(
            gateway.url + "/v1/responses", content=_body(input="more", previous_response_id=made["id"])
        )
        assert _served_by(follow) == holder
    bystander = other if holder == stub.name else stub
    assert all(r.method == "POST" and "previous" not in r.body.decode() for r in bystander.received)


def test_a_gateway_that_never_saw_a_response_finds_its_holder(
    start_gateway: GatewayFactory, gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory,
    http: httpx.Client,
) -> None:  # fmt: skip
    other = _two_holders(gateway, stub, start_stub)
    fresh = start_gateway()  # another replica behind the load balancer: same fleet, no memory
    for worker in (stub, other):
        fresh.add_worker(worker)
    made = http.post(gateway.url + "/v1/responses", content=_body(input="hi")).json()
    assert _served_by(http.get(fresh.url + f"/v1/responses/{made['id']}")) == made["served_by"]
    for _ in range(4):
        follow = http.post(
            fresh.url + "/v1/responses", content=_body(input="on", previous_response_id=made["id"])
        )
        assert _served_by(follow) == made["served_by"]


def test_a_streamed_response_teaches_the_gateway_its_holder(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory, http: httpx.Client
) -> None:
    other = _two_holders(gateway, stub, start_stub)
    raw = http.post(gateway.url + "/v1/responses", content=_body(input="hi", stream=True)).content
    created = json.loads(raw.split(b"\n")[1].removeprefix(b"data: "))
    response_id, holder = created["response"]["id"], created["response"]["served_by"]
    before = stub.count + other.count
    assert _served_by(http.get(gateway.url + f"/v1/responses/{response_id}")) == holder
    assert stub.count + other.count == before + 1  # straight there: no lookup asked both


def test_an_unknown_response_is_404_in_openai_shape(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    error = assert_openai_error(http.get(gateway.url + "/v1/responses/resp_never_made"), 404)
    assert (error["code"], error["param"]) == ("response_not_found", "response_id")
    follow = http.post(
        gateway.url + "/v1/responses", content=_body(input="x", previous_response_id="resp_never")
    )
    assert_openai_error(follow, 404)  # no holder: the worker's own answer


def test_a_previous_response_id_that_is_not_a_string_is_400(
    gateway: GatewayHandle, http: httpx.Client
) -> None:
    error = assert_openai_error(
        http.post(gateway.url + "/v1/responses", content=_body(input="x", previous_response_id=7)), 400
    )
    assert error["param"] == "previous_response_id"


# --- docs -------------------------------------------------------------------------------------


def test_openapi_describes_every_route_the_data_routes_included(
    gateway: GatewayHandle, http: httpx.Client
) -> None:
    schema = http.get(gateway.url + "/openapi.json").json()
    paths = schema["paths"]
    for path in MODEL_ROUTES:
        post = paths[path]["post"]
        body_ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        model = schema["components"]["schemas"][body_ref.rsplit("/", 1)[1]]
        assert "model" in model["required"], path
        assert {"200", "400", "401", "404", "503"} <= set(post["responses"]), path
    assert "get" in paths["/v1/responses/{response_id}"]
    assert {"/v1/models", "/v1/models/{model}", "/health", "/metrics"} <= set(paths)
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert {"application/json", "text/event-stream"} <= set(chat)
    docs = http.get(gateway.url + "/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# --- extending the app ------------------------------------------------------------------------


class _Stamp:
    """A team's middleware: stamps every answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-team", b"seen")]
            await send(message)

        await self.app(scope, receive, stamped)


def test_a_teams_middleware_and_routes_apply_to_data_routes_too(
    start_gateway: GatewayFactory, stub: StubWorker, http: httpx.Client
) -> None:
    def extend(app: FastAPI) -> None:
        app.add_middleware(_Stamp)

        @app.get("/team/ping")
        async def ping() -> dict[str, str]:
            return {"pong": "yes"}

    gw = start_gateway(customize=extend)
    gw.add_worker(stub)
    chat = http.post(gw.url + "/v1/chat/completions", content=_body(messages=[]))
    assert chat.status_code == 200 and chat.headers["x-team"] == "seen"
    assert http.get(gw.url + "/team/ping").json() == {"pong": "yes"}


class _Broken:
    """A routing policy with a bug in it."""

    def choose(self, candidates: Sequence[WorkerRecord], inflight: object) -> WorkerRecord:
        raise RuntimeError("a bug")


def test_an_unexpected_error_on_a_data_route_is_500_in_openai_shape(
    start_gateway: GatewayFactory, stub: StubWorker, http: httpx.Client
) -> None:
    gw = start_gateway(policy=_Broken())
    gw.add_worker(stub)
    error = assert_openai_error(http.post(gw.url + "/v1/chat/completions", content=_body(messages=[])), 500)
    assert error["type"] == "server_error"
    assert "a bug" not in error["message"]  # never a traceback or internals


def _connections_to(port: int) -> int:
    """Established TCP connections on this host whose far end is `port` (from /proc)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
            count += 1
    return count


def test_a_lookup_left_unanswered_when_another_worker_held_the_response_closes_its_connection(
    start_gateway: GatewayFactory, gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory,
    http: httpx.Client,
) -> None:  # fmt: skip
    made = http.post(gateway.url + "/v1/responses", content=_body(input="hi")).json()
    # A worker only the fresh gateway knows: every connection to it is one of its lookups.
    slow = start_stub("slow", response_delay_s=5.0)  # it answers, but long after `stub` has
    fresh = start_gateway()
    for worker in (stub, slow):
        fresh.add_worker(worker)
    assert _served_by(http.get(fresh.url + f"/v1/responses/{made['id']}")) == stub.name
    deadline = time.monotonic() + 2.0
    while _connections_to(slow.server.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _connections_to(slow.server.port) == 0, "the cancelled lookup kept its connection open"


def test_a_worker_behind_a_path_prefix_is_reached_under_it(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    """A worker registered as `http://host:port/team-a/` (behind a reverse proxy, say)."""
    gateway.clear()
    gateway.add_worker(stub.url + "/team-a/")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    resp = http.post(gateway.url + "/v1/chat/completions?tag=1", json=body)
    assert resp.status_code == 200
    assert resp.json()["path"] == "/team-a/v1/chat/completions"
    gateway.clear()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.7:8000", ("10.0.0.7", 8000, False, b"10.0.0.7:8000", b"")),
        ("http://worker.internal", ("worker.internal", 80, False, b"worker.internal", b"")),
        ("https://worker.example/llm/", ("worker.example", 443, True, b"worker.example", b"/llm")),
        ("https://worker.example:8443/a/b", ("worker.example", 8443, True, b"worker.example:8443", b"/a/b")),
        ("http://[::1]:9000/", ("::1", 9000, False, b"[::1]:9000", b"")),
    ],
)
def test_a_worker_url_gives_where_to_connect_and_what_to_send(url: str, expected: tuple[object, ...]) -> None:
    origin = Origin.parse(url)
    assert (origin.host, origin.port, origin.tls, origin.host_header, origin.base_path) == expected
