"""What a client of the gateway sees over HTTP, with stub workers behind it on real sockets."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.stub_worker import StubError, StubWorker, closed_port
from tests.unit.conftest import (
    API_KEY,
    MODEL,
    REFRESH_S,
    GatewayFactory,
    GatewayHandle,
    Servers,
    StubFactory,
    assert_openai_error,
)
from vpool.registry.records import WorkerRecord, WorkerState

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def shared_keyed_gateway(module_servers: Servers) -> GatewayHandle:
    return module_servers.gateway(api_keys=[API_KEY])


@pytest.fixture
def keyed_gateway(shared_keyed_gateway: GatewayHandle, stub: StubWorker) -> GatewayHandle:
    """A gateway that wants API_KEY, with `stub` as its one READY worker."""
    shared_keyed_gateway.clear()
    shared_keyed_gateway.add_worker(stub)
    return shared_keyed_gateway


def chat_body(model: str = MODEL, **fields: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` lines of an SSE body, in order."""
    assert raw.endswith(b"\n\n"), raw[-80:]
    return [event for event in raw.split(b"\n\n") if event]


# --- streaming --------------------------------------------------------------------------------


def test_stream_is_server_sent_events_of_json_ending_with_done(
    gateway: GatewayHandle, http: httpx.Client
) -> None:
    resp = http.post(gateway.url + CHAT, content=chat_body(stream=True))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.content)
    assert all(event.startswith(b"data: ") for event in events)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["tok0 ", "tok1 ", "tok2 "]


@pytest.mark.parametrize(("path", "kind"), [(CHAT, "chat"), ("/v1/completions", "completions")])
def test_stream_events_arrive_byte_for_byte_as_the_worker_sent_them(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client, path: str, kind: str
) -> None:
    stub.events = 5
    body = json.dumps({"model": MODEL, "prompt": "hi", "messages": [], "stream": True}).encode()
    with http.stream("POST", gateway.url + path, content=body) as resp:
        raw = b"".join(resp.iter_raw())
    assert raw == b"".join(stub.stream_events(MODEL, kind))


def test_stream_events_reach_the_client_while_the_worker_is_still_producing(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    interval = 0.15
    stub.events, stub.event_interval_s = 3, interval
    started = time.perf_counter()
    arrivals = []
    with http.stream("POST", gateway.url + CHAT, content=chat_body(stream=True)) as resp:
        for chunk in resp.iter_raw():
            arrivals.append((time.perf_counter() - started, chunk))
    first_at, first = arrivals[0]
    assert first.startswith(b"data: {")
    # Three pauses separate the first event from `[DONE]`: a buffered stream would not show them.
    assert arrivals[-1][0] - first_at >= 2.5 * interval
    assert arrivals[-1][1].endswith(b"data: [DONE]\n\n")


def test_original_request_bytes_reach_the_worker_unchanged(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    odd = (
        b'{ "messages" :[ {"content":"h\\u00e9llo \xc3\xa9","role":"user"} ],\n'
        b'\t"temperature": 0.50, "zz_unknown_field": {"b": 1, "a": 2},\n  "model":"tiny-chat" }'
    )
    streamed = odd.replace(b'"model"', b'"stream" : true , "model"')
    assert http.post(gateway.url + CHAT, content=odd).status_code == 200
    with http.stream("POST", gateway.url + CHAT, content=streamed) as resp:
        resp.read()
    # A stream is asked for its usage (metering): one member added last, every byte before
    # it as the client sent it.
    end = streamed.rindex(b"}")
    asked = b',"stream_options":{"include_usage":true,"continuous_usage_stats":true}'
    assert stub.bodies == [odd, streamed[:end] + asked + streamed[end:]]


# --- errors the gateway answers itself ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param(b'{"model": "tiny-chat", "messages": [', None, id="malformed-json"),
        pytest.param(b"", None, id="empty-body"),
        pytest.param(b'[{"model": "tiny-chat"}]', None, id="json-list"),
        pytest.param(b'{"messages": []}', "model", id="missing-model"),
        pytest.param(b'{"model": 7, "messages": []}', "model", id="numeric-model"),
        pytest.param(b'{"model": "", "messages": []}', "model", id="empty-model"),
        pytest.param(b'{"model": "tiny-chat", "stream": "yes"}', "stream", id="string-stream"),
        pytest.param(b'{"model": "tiny-chat", "stream_options": 1}', "stream_options", id="bad-options"),
    ],
)
def test_invalid_request_is_400_openai_error_and_never_reaches_a_worker(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client, body: bytes, param: str | None
) -> None:
    resp = http.post(gateway.url + CHAT, content=body, headers={"content-type": "application/json"})
    error = assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert stub.count == 0


def test_body_over_the_limit_is_413_when_its_length_is_declared(
    start_gateway: GatewayFactory, stub: StubWorker, http: httpx.Client
) -> None:
    gw = start_gateway(max_body_bytes=1024)
    gw.add_worker(stub)
    resp = http.post(gw.url + CHAT, content=chat_body(padding="x" * 2000))
    error = assert_openai_error(resp, 413)
    assert "1024" in error["message"]
    # Part of the body may be unread: the connection is not used again.
    assert resp.headers["connection"] == "close"
    assert stub.count == 0


def test_body_over_the_limit_is_413_when_it_is_sent_chunked(
    start_gateway: GatewayFactory, stub: StubWorker, http: httpx.Client
) -> None:
    gw = start_gateway(max_body_bytes=1024)
    gw.add_worker(stub)
    body = chat_body(padding="x" * 2000)
    resp = http.post(gw.url + CHAT, content=iter([body[:600], body[600:]]))
    assert "content-length" not in resp.request.headers
    assert_openai_error(resp, 413)
    assert resp.headers["connection"] == "close"
    assert stub.count == 0


def test_body_at_the_limit_is_accepted(
    start_gateway: GatewayFactory, stub: StubWorker, http: httpx.Client
) -> None:
    body = chat_body()
    gw = start_gateway(max_body_bytes=len(body))
    gw.add_worker(stub)
    assert http.post(gw.url + CHAT, content=body).status_code == 200


def test_unknown_model_is_404_naming_the_model(gateway: GatewayHandle, http: httpx.Client) -> None:
    resp = http.post(gateway.url + CHAT, content=chat_body("no-such-model"))
    error = assert_openai_error(resp, 404)
    assert "no-such-model" in error["message"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


def test_catalog_model_without_a_ready_worker_is_503_with_retry_after(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(catalog=["big-model"])
    draining = start_stub("draining")
    gw.add_worker(draining, ["big-model"], state=WorkerState.DRAINING)
    resp = http.post(gw.url + CHAT, content=chat_body("big-model"))
    error = assert_openai_error(resp, 503)
    assert "big-model" in error["message"]
    assert int(resp.headers["retry-after"]) >= 1
    assert draining.count == 0


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        pytest.param(None, 401, id="missing"),
        pytest.param("Bearer sk-wrong", 401, id="wrong"),
        pytest.param(f"Basic {API_KEY}", 401, id="not-bearer"),
        pytest.param("Bearer", 401, id="no-key"),
        pytest.param(f"Bearer {API_KEY}", 200, id="right"),
    ],
)
def test_api_key_is_required_on_every_openai_route(
    keyed_gateway: GatewayHandle, stub: StubWorker, http: httpx.Client, authorization: str | None, status: int
) -> None:
    gw = keyed_gateway
    headers = {"authorization": authorization} if authorization is not None else {}
    chat = http.post(gw.url + CHAT, content=chat_body(), headers=headers)
    models = http.get(gw.url + "/v1/models", headers=headers)
    for resp in (chat, models):
        if status == 401:
            error = assert_openai_error(resp, 401)
            assert error["code"] == "invalid_api_key"
        else:
            assert resp.status_code == 200, resp.text
    assert stub.count == (1 if status == 200 else 0)


def test_unknown_route_is_404_in_openai_shape(gateway: GatewayHandle, http: httpx.Client) -> None:
    resp = http.post(gateway.url + "/v1/no-such-route", content=chat_body())
    error = assert_openai_error(resp, 404)
    assert "/v1/no-such-route" in error["message"]
    assert "detail" not in resp.json()


def test_wrong_method_is_405_in_openai_shape(gateway: GatewayHandle, http: httpx.Client) -> None:
    assert_openai_error(http.get(gateway.url + CHAT), 405)


# --- errors from workers -----------------------------------------------------------------------


def test_worker_detail_error_comes_back_with_its_status_in_openai_shape(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    stub.error = StubError.vllm_detail(400, "This model's maximum context length is 2048 tokens.")
    resp = http.post(gateway.url + CHAT, content=chat_body())
    error = assert_openai_error(resp, 400)
    assert error["message"] == "This model's maximum context length is 2048 tokens."
    assert error["type"] == "invalid_request_error"


def test_worker_openai_error_body_comes_back_unchanged(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    stub.error = StubError.openai(400, "`n` must be at least 1.", param="n", code=400)
    resp = http.post(gateway.url + CHAT, content=chat_body(n=0))
    assert resp.status_code == 400
    assert resp.content == stub.error.body


def test_worker_that_refuses_connections_costs_no_request(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    gateway.add_worker(f"http://127.0.0.1:{closed_port()}", worker_id="refusing")
    statuses = [http.post(gateway.url + CHAT, content=chat_body()).status_code for _ in range(12)]
    assert statuses == [200] * 12
    assert stub.count == 12


def test_only_worker_refusing_connections_is_502_openai_error(
    start_gateway: GatewayFactory, http: httpx.Client
) -> None:
    gw = start_gateway()
    gw.add_worker(f"http://127.0.0.1:{closed_port()}", worker_id="refusing")
    error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 502)
    assert error["type"] == "upstream_error"


def test_worker_dying_mid_stream_ends_it_with_an_error_event_and_no_done(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    stub.events, stub.die_after_events = 4, 2
    with http.stream("POST", gateway.url + CHAT, content=chat_body(stream=True)) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    events = sse_events(raw)
    assert raw.startswith(b"".join(stub.stream_events(MODEL)[:2]))
    assert len(events) == 3
    assert b"[DONE]" not in raw
    assert events[-1].startswith(b"data: ")
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert set(last) == {"error"}
    assert last["error"]["message"]


def test_worker_error_to_a_stream_request_comes_back_as_a_json_error(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    stub.error = StubError.vllm_detail(400, "prompt too long")
    resp = http.post(gateway.url + CHAT, content=chat_body(stream=True))
    error = assert_openai_error(resp, 400)
    assert error["message"] == "prompt too long"


def test_worker_answering_too_slowly_is_504_openai_error(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(read_timeout_s=0.2)
    gw.add_worker(start_stub("slow", response_delay_s=0.5))
    error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 504)
    assert error["type"] == "timeout"


def test_client_leaving_mid_stream_cancels_the_worker_request(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    stub.events, stub.event_interval_s = 100, 0.02
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", gateway.url + CHAT, content=chat_body(stream=True)) as resp:
            first = next(resp.iter_raw())
            assert first.startswith(b"data: {")
    deadline = time.monotonic() + 3
    while stub.streams_cut == 0:
        assert time.monotonic() < deadline, "the worker kept streaming to a client that left"
        time.sleep(0.01)


# --- fleet views --------------------------------------------------------------------------------


def test_models_lists_exactly_the_models_with_a_ready_worker(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(catalog=["catalog-only"])
    gw.add_worker(start_stub("a"), ["alpha", "alpha-alias"])
    gw.add_worker(start_stub("b"), ["beta"], state=WorkerState.DRAINING)
    gw.add_worker(start_stub("c"), ["gamma"], state=WorkerState.FAILED)
    gw.add_worker(start_stub("d"), ["delta"], state=WorkerState.LAUNCHING)
    resp = http.get(gw.url + "/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert sorted(m["id"] for m in body["data"]) == ["alpha", "alpha-alias"]
    for entry in body["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str)


def test_health_reports_registry_and_ready_workers_per_model(
    gateway: GatewayHandle, start_stub: StubFactory, http: httpx.Client
) -> None:
    gateway.add_worker(start_stub("second"))
    resp = http.get(gateway.url + "/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["registry"] == "ok"
    assert body["models"] == {MODEL: 2}
    assert 0 <= body["last_refresh_age_s"] < 5


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text; 0 when the series does not exist yet."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_metrics_count_requests_in_prometheus_text(gateway: GatewayHandle, http: httpx.Client) -> None:
    ok = {"route": "chat", "model": MODEL, "status": "200"}
    not_found = {"route": "chat", "model": "-", "status": "404"}
    before = http.get(gateway.url + "/metrics").text
    assert http.post(gateway.url + CHAT, content=chat_body()).status_code == 200
    assert http.post(gateway.url + CHAT, content=chat_body("nope")).status_code == 404
    resp = http.get(gateway.url + "/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    after = resp.text
    assert "# TYPE vpool_requests_total counter" in after
    assert metric(after, "vpool_requests_total", **ok) == metric(before, "vpool_requests_total", **ok) + 1
    assert (
        metric(after, "vpool_requests_total", **not_found)
        == metric(before, "vpool_requests_total", **not_found) + 1
    )
    assert metric(after, "vpool_ready_workers", model=MODEL) == 1
    assert metric(after, "vpool_registry_up") == 1


HIT_TOKENS = "vpool_worker_prefix_cache_hit_tokens_total"
QUERY_TOKENS = "vpool_worker_prefix_cache_query_tokens_total"


def _prefix_series(text: str) -> dict[str, tuple[float, float]]:
    """worker id → (queried, hit) tokens, from the gateway's Prometheus text."""
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (QUERY_TOKENS, HIT_TOKENS):
                pair = found.setdefault(sample.labels["worker"], [0.0, 0.0])
                pair[sample.name == HIT_TOKENS] = sample.value
    return {worker: (pair[0], pair[1]) for worker, pair in found.items()}


def test_metrics_show_each_workers_prefix_cache_counters_until_it_leaves(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory, http: httpx.Client
) -> None:
    gateway.clear()
    a = gateway.add_worker(stub, worker_id="a", prefix_cache_queries=6150, prefix_cache_hits=3968)
    gateway.add_worker(start_stub("b"), ["other-model"], worker_id="b")
    text = http.get(gateway.url + "/metrics").text
    assert "# TYPE vpool_worker_prefix_cache_hit_tokens_total counter" in text
    assert metric(text, HIT_TOKENS, worker="a", model=MODEL) == 3968
    assert metric(text, QUERY_TOKENS, worker="a", model=MODEL) == 6150
    # A worker that has looked nothing up yet starts its series at 0, so `rate` sees its first rise.
    assert _prefix_series(text)["b"] == (0, 0)

    # The next heartbeat's totals, as soon as the gateway's refresh reads them.
    load = a.load.model_copy(update={"prefix_cache_queries": 8200, "prefix_cache_hits": 5952})
    gateway.server.call(gateway.registry.heartbeat("a", load, 300))
    gateway.refresh()
    assert _prefix_series(http.get(gateway.url + "/metrics").text)["a"] == (8200, 5952)

    gateway.remove("a")
    gateway.refresh()
    assert set(_prefix_series(http.get(gateway.url + "/metrics").text)) == {"b"}


def test_an_external_server_has_no_prefix_cache_series(gateway: GatewayHandle, http: httpx.Client) -> None:
    """Its heartbeats come from the controller's probe, which knows nothing of its cache: a 0
    there would read as a worker that never hits."""
    gateway.clear()
    record = WorkerRecord(
        worker_id="ext", url="http://127.0.0.1:9", models=[MODEL], kind="external", state=WorkerState.READY
    )
    gateway.server.call(gateway.registry.put(record, 300))
    gateway.refresh()
    text = http.get(gateway.url + "/metrics").text
    assert metric(text, "vpool_ready_workers", model=MODEL) == 1
    assert _prefix_series(text) == {}
    record = record.model_copy(update={"kind": "vpool"})
    gateway.server.call(gateway.registry.put(record, 300))
    gateway.refresh()
    assert _prefix_series(http.get(gateway.url + "/metrics").text) == {"ext": (0, 0)}


# --- routing --------------------------------------------------------------------------------------


def test_sequential_requests_reach_both_idle_replicas(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory, http: httpx.Client
) -> None:
    other = start_stub("other")
    gateway.add_worker(other)
    for _ in range(30):
        assert http.post(gateway.url + CHAT, content=chat_body()).status_code == 200
    assert stub.count + other.count == 30
    assert stub.count > 0 and other.count > 0


def post_concurrently(url: str, count: int, *stubs: StubWorker) -> list[int]:
    """`count` requests at once; the stubs hold every answer until all of them have arrived."""
    release = threading.Event()
    for stub in stubs:
        stub.hold = release
    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(client.post, url + CHAT, content=chat_body()) for _ in range(count)]
        deadline = time.monotonic() + 5
        while sum(stub.count for stub in stubs) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        release.set()
        return [future.result().status_code for future in futures]


def test_concurrent_requests_spread_evenly_over_idle_replicas(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory
) -> None:
    other = start_stub("other")
    gateway.add_worker(other)
    assert post_concurrently(gateway.url, 8, stub, other) == [200] * 8
    assert (stub.count, other.count) == (4, 4)


def test_concurrent_requests_avoid_the_replica_with_a_long_queue(
    start_gateway: GatewayFactory, start_stub: StubFactory
) -> None:
    gw = start_gateway()
    busy, idle = start_stub("busy"), start_stub("idle")
    gw.add_worker(busy, waiting=100)
    gw.add_worker(idle, waiting=0)
    assert post_concurrently(gw.url, 8, busy, idle) == [200] * 8
    assert (busy.count, idle.count) == (0, 8)


@pytest.mark.parametrize("how", ["removed", "draining"])
def test_worker_leaving_the_registry_stops_getting_traffic_without_a_restart(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory, http: httpx.Client, how: str
) -> None:
    leaving = start_stub("leaving")
    record = gateway.add_worker(leaving)
    while leaving.count == 0:
        assert http.post(gateway.url + CHAT, content=chat_body()).status_code == 200
    if how == "removed":
        gateway.remove(record.worker_id)
    else:
        gateway.set_state(record.worker_id, WorkerState.DRAINING)
    time.sleep(REFRESH_S * 5)
    before = leaving.count
    for _ in range(20):
        assert http.post(gateway.url + CHAT, content=chat_body()).status_code == 200
    assert leaving.count == before
    assert [m["id"] for m in http.get(gateway.url + "/v1/models").json()["data"]] == [MODEL]


# --- the official openai SDK --------------------------------------------------------------------


@pytest.fixture
def sdk(gateway: GatewayHandle) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-anything", max_retries=0) as client:
        yield client


def test_sdk_gets_a_chat_completion(sdk: openai.OpenAI, stub: StubWorker) -> None:
    completion = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "hello from stub"
    assert completion.usage is not None and completion.usage.total_tokens == 6


def test_sdk_streams_a_chat_completion(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with stream:
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "tok0 tok1 tok2 "


def test_sdk_gets_embeddings(sdk: openai.OpenAI) -> None:
    result = sdk.embeddings.create(model=MODEL, input=["one", "two"])
    assert [item.embedding for item in result.data] == [[0.25, -0.5, 0.125, 1.0]] * 2


def test_sdk_raises_not_found_for_an_unknown_model(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in caught.value.message


def test_sdk_raises_authentication_error_for_a_wrong_key(
    keyed_gateway: GatewayHandle, stub: StubWorker
) -> None:
    gw = keyed_gateway
    with openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0) as client:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert stub.count == 1
