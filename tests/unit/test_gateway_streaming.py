"""Streams through the gateway at their edges: headers, a worker breaking mid-event, a client
that reads slowly, and what the gateway keeps of workers that have gone."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.support.stub_worker import StubWorker
from tests.unit.conftest import MODEL, GatewayFactory, GatewayHandle, StubFactory
from vpool.gateway.upstream import Origin, UpstreamPool

CHAT = "/v1/chat/completions"


def _chat(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_a_stream_tells_caches_and_proxies_not_to_keep_it(gateway: GatewayHandle, http: httpx.Client) -> None:
    resp = http.post(gateway.url + CHAT, content=_chat(stream=True))
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"


def test_a_worker_dying_inside_an_event_ends_the_stream_with_a_separate_error_event(
    gateway: GatewayHandle, stub: StubWorker, http: httpx.Client
) -> None:
    stub.events, stub.die_after_events, stub.die_mid_event = 4, 2, True
    raw = http.post(gateway.url + CHAT, content=_chat(stream=True)).content
    whole = b"".join(stub.stream_events(MODEL)[:2])
    half = stub.stream_events(MODEL)[2][: len(stub.stream_events(MODEL)[2]) // 2]
    assert raw.startswith(whole + half)
    tail = raw[len(whole + half) :]
    # The half event is closed off first, so a client's SSE parser sees the error on its own.
    assert tail.startswith(b"\n\ndata: {")
    error = json.loads(tail.strip().removeprefix(b"data: "))
    assert set(error) == {"error"} and error["error"]["code"] == "stream_error"
    assert b"[DONE]" not in raw


def test_a_slow_reader_holds_the_worker_back_and_its_pause_is_not_the_workers_silence(
    start_gateway: GatewayFactory, stub: StubWorker
) -> None:
    events, padding = 400, 64 * 1024  # ~26 MB: more than every socket buffer on the way holds
    gw = start_gateway(read_timeout_s=0.5)  # a stalled worker would be cut after half a second
    gw.add_worker(stub)
    stub.events, stub.event_padding = events, padding
    url = urlsplit(gw.url)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect((url.hostname, url.port))
        body = _chat(stream=True)
        sock.sendall(
            b"POST %b HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%b" % (CHAT.encode(), len(body), body)
        )
        received = sock.recv(4096)
        time.sleep(1.5)  # three read timeouts without reading a byte
        held_back = stub.events_sent
        sock.settimeout(10)
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert held_back < events, "the gateway buffered the whole stream instead of pausing the worker"
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"stream_timeout" not in chunked
    assert chunked.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert stub.events_sent == events + 1  # and [DONE]


def test_the_gateway_forgets_the_in_flight_counts_of_workers_that_left(
    gateway: GatewayHandle, stub: StubWorker, start_stub: StubFactory, http: httpx.Client
) -> None:
    gone = gateway.add_worker(start_stub("gone"), ["elsewhere"])
    assert http.post(gateway.url + CHAT, content=_chat(model="elsewhere")).status_code == 200
    inflight = gateway.state.fleet.inflight
    assert gone.worker_id in inflight
    gateway.remove(gone.worker_id)
    gateway.refresh()
    assert gone.worker_id not in inflight


async def test_the_idle_pool_keeps_at_most_its_cap_per_worker_closing_the_oldest(stub: StubWorker) -> None:
    pool = UpstreamPool(connect_timeout_s=2, max_idle_per_origin=3)
    origin = Origin.parse(stub.url)
    conns = [await pool.connect(origin) for _ in range(5)]
    for conn in conns:
        pool.release(origin, conn)
    assert [c.closed for c in conns] == [True, True, False, False, False]
    newest = pool.take_idle(origin)
    assert newest is conns[-1]  # newest first: the most likely to be alive
    newest.abort()
    pool.close()
