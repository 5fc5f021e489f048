"""Issue #4 on the gateway side: a dead worker costs no request, bad workers leave rotation
and come back by themselves, nothing hangs. Stub workers and raw sockets behind a real gateway.

Where two workers serve a model, the one that should be tried first is registered with an
empty queue and the other with `waiting=1`: the default policy (least outstanding) then
always picks the first, and a retry (which excludes it) the second.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.stub_worker import StubError, closed_port
from tests.unit.conftest import MODEL, GatewayFactory, GatewayHandle, StubFactory, assert_openai_error
from tests.unit.test_gateway_http import CHAT, chat_body, metric, sse_events
from vpool.config import ModelSpec, Settings
from vpool.gateway.proxy import Timeouts, resolve_timeouts
from vpool.registry.records import WorkerState

OTHER_MODEL = "other-model"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A worker that takes connections (the kernel completes them) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def unconnectable_url() -> Iterator[str]:
    """A worker whose connections never complete: its accept queue (one place) is full.

    Linux drops a SYN to a full queue and the client keeps resending it, as for a host that
    has gone away without a trace: only the connect timeout ends the wait.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        with socket.create_connection(sock.getsockname(), timeout=2):
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def scrape(gw: GatewayHandle, http: httpx.Client) -> str:
    resp = http.get(gw.url + "/metrics")
    assert resp.status_code == 200
    return resp.text


def served_by(resp: httpx.Response) -> str:
    return resp.headers["x-vpool-worker"]


# --- a failed attempt is retried on another worker ---------------------------------------------


@pytest.mark.parametrize("status", [502, 503])
@pytest.mark.parametrize("stream", [False, True])
def test_worker_answering_502_or_503_costs_no_request(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client, status: int, stream: bool
) -> None:
    gw = start_gateway()
    failing = start_stub("failing", error=StubError.vllm_detail(status, "upstream trouble"))
    healthy = start_stub("healthy")
    gw.add_worker(failing, worker_id="failing")
    gw.add_worker(healthy, worker_id="healthy", waiting=1)
    resp = http.post(gw.url + CHAT, content=chat_body(stream=stream))
    assert resp.status_code == 200, resp.text
    assert served_by(resp) == "healthy"
    if stream:
        assert resp.content == b"".join(healthy.stream_events(MODEL))
    else:
        assert resp.json()["choices"][0]["message"]["content"] == "hello from healthy"
    assert (failing.count, healthy.count) == (1, 1)
    assert failing.bodies == healthy.bodies  # the same original bytes, sent twice


def test_draining_worker_answering_503_costs_no_request_until_it_leaves_the_registry(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    # An external server shutting down answers 503 before the registry has caught up.
    gw = start_gateway(eject_after_failures=0)
    draining = start_stub("draining", error=StubError.vllm_detail(503, "The server is shutting down."))
    healthy = start_stub("healthy")
    gw.add_worker(draining, worker_id="draining")
    gw.add_worker(healthy, worker_id="healthy", waiting=1)
    for _ in range(3):
        resp = http.post(gw.url + CHAT, content=chat_body())
        assert (resp.status_code, served_by(resp)) == (200, "healthy")
    assert draining.count == 3
    gw.set_state("draining", WorkerState.DRAINING)
    gw.refresh()
    for _ in range(3):
        assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200
    assert draining.count == 3


def test_refused_connection_is_retried_on_another_worker(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway()
    healthy = start_stub("healthy")
    gw.add_worker(f"http://127.0.0.1:{closed_port()}", worker_id="refusing")
    gw.add_worker(healthy, worker_id="healthy", waiting=1)
    resp = http.post(gw.url + CHAT, content=chat_body(stream=True))
    assert (resp.status_code, served_by(resp)) == (200, "healthy")
    assert resp.content == b"".join(healthy.stream_events(MODEL))


def test_connect_timeout_is_retried_on_another_worker(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client, unconnectable_url: str
) -> None:
    gw = start_gateway(connect_timeout_s=0.3)
    healthy = start_stub("healthy")
    gw.add_worker(unconnectable_url, worker_id="unconnectable")
    gw.add_worker(healthy, worker_id="healthy", waiting=1)
    started = time.monotonic()
    resp = http.post(gw.url + CHAT, content=chat_body())
    assert (resp.status_code, served_by(resp)) == (200, "healthy")
    assert 0.3 <= time.monotonic() - started < 3


def test_worker_silent_before_its_first_byte_is_left_for_another(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client, silent_url: str
) -> None:
    gw = start_gateway(first_byte_timeout_s=0.3)
    healthy = start_stub("healthy")
    gw.add_worker(silent_url, worker_id="silent")
    gw.add_worker(healthy, worker_id="healthy", waiting=1)
    started = time.monotonic()
    resp = http.post(gw.url + CHAT, content=chat_body(stream=True))
    assert (resp.status_code, served_by(resp)) == (200, "healthy")
    assert resp.content == b"".join(healthy.stream_events(MODEL))
    assert 0.3 <= time.monotonic() - started < 3


def test_retry_waits_the_configured_backoff(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(retry_backoff_s=0.4)
    gw.add_worker(start_stub("failing", error=StubError.vllm_detail(503, "busy")), worker_id="failing")
    gw.add_worker(start_stub("healthy"), worker_id="healthy", waiting=1)
    started = time.monotonic()
    assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200
    assert time.monotonic() - started >= 0.4


# --- when no attempt succeeds ------------------------------------------------------------------


def test_only_worker_answering_503_passes_its_error_on_in_openai_shape(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway()
    only = start_stub("only", error=StubError.vllm_detail(503, "The server is shutting down."))
    gw.add_worker(only, worker_id="only")
    resp = http.post(gw.url + CHAT, content=chat_body(stream=True))
    error = assert_openai_error(resp, 503)
    assert error["message"] == "The server is shutting down."
    assert error["type"] == "service_unavailable"
    assert served_by(resp) == "only"
    assert only.count == 1  # no other worker to try


def test_plain_text_503_from_a_proxy_in_front_of_a_worker_comes_back_in_openai_shape(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway()
    gw.add_worker(start_stub("only", error=StubError(503, b"Service Unavailable", "text/plain")))
    error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 503)
    assert error["message"] == "Service Unavailable"


def test_when_every_attempt_fails_the_client_gets_the_last_workers_error(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(max_attempts=2)
    first = start_stub("first", error=StubError.vllm_detail(503, "first is busy"))
    second = start_stub("second", error=StubError.vllm_detail(502, "second lost its engine"))
    third = start_stub("third")
    gw.add_worker(first, worker_id="first")
    gw.add_worker(second, worker_id="second", waiting=1)
    gw.add_worker(third, worker_id="third", waiting=2)
    resp = http.post(gw.url + CHAT, content=chat_body())
    error = assert_openai_error(resp, 502)
    assert error["message"] == "second lost its engine"
    assert served_by(resp) == "second"
    assert (first.count, second.count, third.count) == (1, 1, 0)  # two attempts, no more


def test_every_worker_refusing_is_502_openai_error(start_gateway: GatewayFactory, http: httpx.Client) -> None:
    gw = start_gateway(max_attempts=3)
    for name in ("a", "b", "c"):
        gw.add_worker(f"http://127.0.0.1:{closed_port()}", worker_id=name)
    error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 502)
    assert error["type"] == "upstream_error"
    assert f"`{MODEL}`" in error["message"]


def test_only_worker_silent_before_its_first_byte_is_504_openai_error(
    start_gateway: GatewayFactory, http: httpx.Client, silent_url: str
) -> None:
    gw = start_gateway(first_byte_timeout_s=0.3)
    gw.add_worker(silent_url, worker_id="silent")
    started = time.monotonic()
    error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body(stream=True)), 504)
    assert error["type"] == "timeout"
    assert "silent" in error["message"]
    assert time.monotonic() - started < 3


def test_worker_silent_after_another_answered_503_is_504_openai_error(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client, silent_url: str
) -> None:
    gw = start_gateway(first_byte_timeout_s=0.3, read_timeout_s=10.0)
    gw.add_worker(start_stub("busy", error=StubError.vllm_detail(503, "busy")), worker_id="busy")
    gw.add_worker(silent_url, worker_id="silent", waiting=1)
    started = time.monotonic()
    error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 504)
    assert "silent did not answer within 0.3 s" in error["message"]
    assert time.monotonic() - started < 3


# --- per-model timeouts; nobody else waits ------------------------------------------------------


def test_first_byte_timeout_is_per_model_and_a_silent_worker_holds_up_nobody_else(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client, silent_url: str
) -> None:
    gw = start_gateway(read_timeout_s=10.0, model_timeouts={MODEL: {"first_byte_timeout_s": 1.0}})
    gw.add_worker(silent_url, worker_id="silent")
    slow = start_stub("slow", response_delay_s=1.5)  # slower than MODEL's timeout, not the default
    gw.add_worker(slow, [OTHER_MODEL], worker_id="slow")
    fast = start_stub("fast")
    gw.add_worker(fast, ["fast-model"], worker_id="fast")
    with ThreadPoolExecutor(2) as pool:
        silent = pool.submit(http.post, gw.url + CHAT, content=chat_body())
        slow_answer = pool.submit(http.post, gw.url + CHAT, content=chat_body(OTHER_MODEL))
        time.sleep(0.1)
        for _ in range(5):  # while both wait, others are served at once
            started = time.monotonic()
            assert http.post(gw.url + CHAT, content=chat_body("fast-model")).status_code == 200
            assert time.monotonic() - started < 0.5
        assert_openai_error(silent.result(), 504)
        assert slow_answer.result().status_code == 200


def test_model_timeouts_follow_a_catalog_model_to_its_aliases() -> None:
    settings = Settings(
        gateway={
            "connect_timeout_s": 5,
            "read_timeout_s": 60,
            "model_timeouts": {"chat": {"first_byte_timeout_s": 2}, "external": {"connect_timeout_s": 1}},
        },
        models=[ModelSpec(name="tiny-chat", model="builtin:tiny-chat", aliases=["chat", "tc"])],
    )
    default, by_model = resolve_timeouts(settings)
    assert default == Timeouts(connect_s=5, first_byte_s=60, read_s=60)
    assert by_model == {
        "tiny-chat": Timeouts(5, 2, 60),
        "chat": Timeouts(5, 2, 60),
        "tc": Timeouts(5, 2, 60),
        "external": Timeouts(1, 60, 60),
    }


# --- never retried once the client has bytes ----------------------------------------------------


def test_stream_that_breaks_after_its_first_event_is_never_retried(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway()
    dying = start_stub("dying", events=4, die_after_events=2)
    spare = start_stub("spare")
    gw.add_worker(dying, worker_id="dying")
    gw.add_worker(spare, worker_id="spare", waiting=1)
    with http.stream("POST", gw.url + CHAT, content=chat_body(stream=True)) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    assert raw.startswith(b"".join(dying.stream_events(MODEL)[:2]))
    assert b"[DONE]" not in raw
    last = json.loads(sse_events(raw)[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "stream_error"
    assert spare.count == 0


def test_stream_that_goes_quiet_ends_with_an_error_event_and_is_never_retried(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = start_gateway(read_timeout_s=0.3)
    stalling = start_stub("stalling", events=3, event_interval_s=2.0)
    spare = start_stub("spare")
    gw.add_worker(stalling, worker_id="stalling")
    gw.add_worker(spare, worker_id="spare", waiting=1)
    with http.stream("POST", gw.url + CHAT, content=chat_body(stream=True)) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    events = sse_events(raw)
    assert events[0] + b"\n\n" == stalling.stream_events(MODEL)[0]
    assert json.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "stream_timeout"
    assert b"[DONE]" not in raw
    assert spare.count == 0


# --- passive ejection -------------------------------------------------------------------------


def ejecting_gateway(start_gateway: GatewayFactory, cooldown_s: float) -> GatewayHandle:
    return start_gateway(eject_after_failures=2, eject_cooldown_s=cooldown_s, retry_backoff_s=0.0)


def test_failing_worker_leaves_rotation_and_returns_after_its_cooldown(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = ejecting_gateway(start_gateway, cooldown_s=0.5)
    bad = start_stub("bad", error=StubError.vllm_detail(503, "engine restarting"))
    good = start_stub("good")
    gw.add_worker(bad, worker_id="bad")
    gw.add_worker(good, worker_id="good", waiting=1)
    for _ in range(2):
        assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200
    assert bad.count == 2
    text = scrape(gw, http)
    assert metric(text, "vpool_worker_ejections_total") == 1
    assert metric(text, "vpool_ejected_workers") == 1
    for _ in range(5):  # ejected: not even tried
        resp = http.post(gw.url + CHAT, content=chat_body())
        assert (resp.status_code, served_by(resp)) == (200, "good")
    assert bad.count == 2

    bad.error = None  # it recovers; after the cooldown its trial request succeeds
    time.sleep(0.6)
    resp = http.post(gw.url + CHAT, content=chat_body())
    assert (resp.status_code, served_by(resp)) == (200, "bad")
    for _ in range(3):  # back in rotation, the least loaded again
        assert served_by(http.post(gw.url + CHAT, content=chat_body())) == "bad"
    assert metric(scrape(gw, http), "vpool_ejected_workers") == 0


def test_failed_trial_ejects_the_worker_again_for_longer(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = ejecting_gateway(start_gateway, cooldown_s=0.5)
    bad = start_stub("bad", error=StubError.vllm_detail(503, "still broken"))
    gw.add_worker(bad, worker_id="bad")
    gw.add_worker(start_stub("good"), worker_id="good", waiting=1)
    for _ in range(2):
        assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200
    time.sleep(0.6)
    assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200  # the trial, retried
    assert bad.count == 3
    time.sleep(0.6)  # past the first cooldown, not the doubled one
    assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200
    assert bad.count == 3
    time.sleep(0.5)
    assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200
    assert bad.count == 4
    assert metric(scrape(gw, http), "vpool_worker_ejections_total") == 3


def test_half_open_worker_takes_one_trial_request_at_a_time(
    start_gateway: GatewayFactory, start_stub: StubFactory
) -> None:
    gw = ejecting_gateway(start_gateway, cooldown_s=0.3)
    recovering = start_stub("recovering", error=StubError.vllm_detail(503, "warming up"))
    good = start_stub("good")
    gw.add_worker(recovering, worker_id="recovering")
    gw.add_worker(good, worker_id="good", waiting=1)
    with httpx.Client(timeout=10) as client:
        for _ in range(2):
            assert client.post(gw.url + CHAT, content=chat_body()).status_code == 200
        recovering.error = None
        time.sleep(0.4)
        release = threading.Event()
        recovering.hold = release
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.post, gw.url + CHAT, content=chat_body()) for _ in range(4)]
            deadline = time.monotonic() + 5
            while recovering.count < 3 or good.count < 5:
                assert time.monotonic() < deadline, (recovering.count, good.count)
                time.sleep(0.005)
            time.sleep(0.1)
            release.set()
            answers = [future.result() for future in futures]
    assert [a.status_code for a in answers] == [200] * 4
    assert sorted(served_by(a) for a in answers) == ["good", "good", "good", "recovering"]


def test_ejection_never_leaves_a_model_with_no_worker_to_try(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = ejecting_gateway(start_gateway, cooldown_s=30.0)
    only = start_stub("only", error=StubError.vllm_detail(503, "overloaded"))
    gw.add_worker(only, worker_id="only")
    for expected_count in range(1, 5):
        error = assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 503)
        assert error["message"] == "overloaded"
        assert only.count == expected_count  # ejected after two, still tried every time
    assert metric(scrape(gw, http), "vpool_ejected_workers") == 1
    only.error = None
    assert http.post(gw.url + CHAT, content=chat_body()).status_code == 200


def test_client_errors_do_not_eject_a_worker(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client
) -> None:
    gw = ejecting_gateway(start_gateway, cooldown_s=30.0)
    picky = start_stub("picky", error=StubError.vllm_detail(400, "prompt too long"))
    gw.add_worker(picky, worker_id="picky")
    gw.add_worker(start_stub("other"), worker_id="other", waiting=1)
    for _ in range(4):
        assert_openai_error(http.post(gw.url + CHAT, content=chat_body()), 400)
    assert picky.count == 4
    assert metric(scrape(gw, http), "vpool_worker_ejections_total") == 0


# --- metrics -----------------------------------------------------------------------------------


def test_retries_and_upstream_errors_are_counted_by_reason(
    start_gateway: GatewayFactory, start_stub: StubFactory, http: httpx.Client, silent_url: str
) -> None:
    gw = start_gateway(first_byte_timeout_s=0.3, retry_backoff_s=0.0)
    healthy = start_stub("healthy")
    busy = start_stub("busy", error=StubError.vllm_detail(503, "busy"))
    failing = {
        "connect_error": f"http://127.0.0.1:{closed_port()}",
        "http_503": busy.url,
        "first_byte_timeout": silent_url,
    }
    for reason, url in failing.items():
        gw.clear()
        gw.add_worker(url, worker_id=reason)
        gw.add_worker(healthy, worker_id="healthy", waiting=1)
        resp = http.post(gw.url + CHAT, content=chat_body())
        assert (resp.status_code, served_by(resp)) == (200, "healthy")
    text = scrape(gw, http)
    for reason in failing:
        assert metric(text, "vpool_retries_total", reason=reason) == 1, reason
        assert metric(text, "vpool_upstream_errors_total", kind=reason) == 1, reason
    assert metric(text, "vpool_requests_total", route="chat", model=MODEL, status="200") == 3
