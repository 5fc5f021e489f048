"""HTTP/1.1 as raw clients speak it to the gateway, hostile ones included: framing byte by byte.

The rule behind the attack cases: one response per request, always. A request whose
framing is ambiguous (CL+TE, two lengths, folded headers, bare LF) is refused whole, so a
load balancer in front and the gateway can never disagree about where a request ends.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from tests.support.raw_worker import RawWorker
from tests.support.stub_worker import StubWorker
from tests.unit.conftest import MODEL, GatewayFactory, GatewayHandle

CHAT = b"/v1/chat/completions"


def _body(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def _request(body: bytes, *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return (
        b"POST " + CHAT + b" HTTP/" + version + b"\r\nhost: gw\r\ncontent-type: application/json\r\n"
        + b"content-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )  # fmt: skip


def _connect(gateway: GatewayHandle) -> socket.socket:
    url = urlsplit(gateway.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    return sock


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


class _Answer:
    """One response as llhttp (httptools) reads it: strictly framed, header names lowercased."""

    def __init__(self, raw: bytes) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete = False
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(raw)
        self.status = parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        assert name.lower() not in self.headers, name
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def _read_one(sock: socket.socket) -> tuple[bytes, bytes]:
    """One content-length framed response from a connection left open: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return head, rest


def _responses(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Split content-length framed responses: [(head, body), ...]."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        out.append((head, rest[:length]))
        raw = rest[length:]
    return out


def test_pipelined_requests_are_answered_in_order_on_one_connection(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    with _connect(gateway) as sock:
        sock.sendall(
            _request(_body(max_tokens=3))
            + _request(_body(model="no-such-model"))
            + _request(_body(max_tokens=5), extra=b"connection: close\r\n")
        )
        responses = _responses(_read_to_eof(sock))
    assert [head.split(b"\r\n")[0] for head, _ in responses] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 200 OK",
    ]
    assert json.loads(responses[0][1])["object"] == "chat.completion"
    assert "no-such-model" in json.loads(responses[1][1])["error"]["message"]
    assert b"connection: close" in responses[2][0].lower()
    assert [json.loads(b)["max_tokens"] for b in stub.bodies] == [3, 5]


def test_expect_100_continue_gets_continue_before_the_body(gateway: GatewayHandle) -> None:
    body = _body()
    with _connect(gateway) as sock:
        head = _request(body, extra=b"expect: 100-continue\r\nconnection: close\r\n")[: -len(body)]
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        ((head, answer),) = _responses(_read_to_eof(sock))
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(answer)["object"] == "chat.completion"


def test_http_1_0_client_gets_a_stream_ended_by_close_not_chunks(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        sock.sendall(_request(_body(stream=True), version=b"1.0"))
        raw = _read_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"text/event-stream" in head
    assert body.endswith(b"data: [DONE]\n\n")


def test_malformed_http_is_400_openai_error_and_closes(gateway: GatewayHandle, stub: StubWorker) -> None:
    with _connect(gateway) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        raw = _read_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert stub.count == 0


def test_a_refusal_is_well_formed_http_with_a_date_and_says_why(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        answer = _Answer(_read_to_eof(sock))
    assert answer.status == 400 and answer.complete
    assert answer.headers[b"connection"] == b"close"
    assert answer.headers[b"content-type"] == b"application/json"
    time.strptime(answer.headers[b"date"].decode(), "%a, %d %b %Y %H:%M:%S GMT")
    error = json.loads(answer.body)["error"]
    assert error["code"] == "malformed_http" and error["message"]


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (_body(), b"200"),
        (json.dumps({"model": "no-such-model", "messages": []}).encode(), b"404"),
        (b"{not json", b"400"),
    ],
    ids=["answer", "no-worker", "refused-before-routing"],
)
def test_keep_alive_connection_serves_requests_one_after_another(
    gateway: GatewayHandle, first: bytes, status: bytes
) -> None:
    """After an answer, or an error the gateway gave itself (a 404 with no worker tried, a
    400 before routing), the connection serves the next request."""
    with _connect(gateway) as sock:
        sock.sendall(_request(first))
        head, _ = _read_one(sock)
        assert head.startswith(b"HTTP/1.1 " + status)
        for _ in range(2):
            sock.sendall(_request(_body()))
            head, rest = _read_one(sock)
            assert head.startswith(b"HTTP/1.1 200")
            assert json.loads(rest)["object"] == "chat.completion"


def _get(path: bytes, *, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/" + version + b"\r\nhost: gw\r\n" + extra + b"\r\n"


def test_head_gets_the_headers_without_a_body(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        sock.sendall(
            b"HEAD /health HTTP/1.1\r\nhost: gw\r\n\r\n" + _get(b"/health", extra=b"connection: close\r\n")
        )
        raw = _read_to_eof(sock)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head
    assert rest.startswith(b"HTTP/1.1 200")  # the next answer follows at once: no body in between
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["status"] in ("ok", "degraded")


def test_upgrade_request_is_answered_as_plain_http_1_1(gateway: GatewayHandle, stub: StubWorker) -> None:
    with _connect(gateway) as sock:
        sock.sendall(
            _request(
                _body(),
                extra=b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
            )
        )
        data = b""
        while b"chat.completion" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert data.count(b"HTTP/1.1") == 1
    assert stub.count == 1


def test_oversized_headers_are_431_openai_error(gateway: GatewayHandle, stub: StubWorker) -> None:
    with _connect(gateway) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n")
        with contextlib.suppress(OSError):  # the gateway may close before we finish sending
            for _ in range(40):
                sock.sendall(b"x-padding: " + b"a" * 16_000 + b"\r\n")
        raw = _read_to_eof(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431")
    assert json.loads(body)["error"]["code"] == "headers_too_large"
    assert stub.count == 0


def test_http_1_0_client_is_answered_and_told_the_connection_closes(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        sock.sendall(_get(b"/health", version=b"1.0", extra=b"connection: keep-alive\r\n"))
        raw = _read_to_eof(sock)  # the gateway closes after one answer
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert json.loads(body)["status"] == "ok"


def test_http_1_0_client_gets_a_paced_stream_whole_then_the_close(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    stub.events, stub.event_interval_s = 3, 0.1  # each event a write of its own, the last after 0.2 s
    with _connect(gateway) as sock:
        sock.sendall(_request(_body(stream=True), version=b"1.0"))
        answer = _Answer(_read_to_eof(sock))
    assert answer.status == 200
    assert answer.headers[b"content-type"].startswith(b"text/event-stream")
    assert answer.headers[b"connection"] == b"close"
    assert b"transfer-encoding" not in answer.headers and b"content-length" not in answer.headers
    assert answer.body == b"".join(stub.stream_events(MODEL))


def _team_feed(app: FastAPI) -> None:
    """A team's own route whose answer has no length: a stream."""

    @app.api_route("/team/feed", methods=["GET", "HEAD"])
    async def feed() -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            yield b"one\n"
            yield b"two\n"

        return StreamingResponse(lines(), media_type="text/plain")


def _team_raw_feed(app: FastAPI) -> None:
    """A team's raw ASGI app with no length, whose last body message leaves `more_body`
    out (ASGI's default: the last one) and whose head sends no headers at all."""

    async def raw(scope: dict[str, object], receive: object, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"one\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"two\n"})

    app.mount("/team/raw", raw)


def test_http_1_0_client_gets_a_raw_asgi_answer_whole_then_the_close(start_gateway: GatewayFactory) -> None:
    gw = start_gateway(customize=_team_raw_feed)
    with _connect(gw) as sock:
        sock.sendall(_get(b"/team/raw/", version=b"1.0"))
        raw = _read_to_eof(sock)  # a close that never came would time out here
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head.lower()
    assert body == b"one\ntwo\n"


@pytest.mark.parametrize("path", [b"/health", b"/team/feed"], ids=["sized", "streamed"])
def test_http_1_0_head_gets_the_headers_and_no_body(start_gateway: GatewayFactory, path: bytes) -> None:
    gw = start_gateway(customize=_team_feed)
    with _connect(gw) as sock:
        sock.sendall(b"HEAD " + path + b" HTTP/1.0\r\nhost: gw\r\n\r\n")
        raw = _read_to_eof(sock)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert rest == b""


def test_nothing_after_a_connection_close_request_is_answered(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    with _connect(gateway) as sock:
        sock.sendall(_request(_body(), extra=b"connection: close\r\n") + _request(_body()))
        responses = _responses(_read_to_eof(sock))
    assert len(responses) == 1
    assert stub.count == 1


def test_a_long_pipeline_is_answered_in_full(gateway: GatewayHandle) -> None:
    count = 3000
    with _connect(gateway) as sock:
        sock.sendall(_get(b"/health") * (count - 1) + _get(b"/health", extra=b"connection: close\r\n"))
        responses = _responses(_read_to_eof(sock))
    assert len(responses) == count
    assert all(head.startswith(b"HTTP/1.1 200") for head, _ in responses)


def _drip(sock: socket.socket, data: bytes, every_s: float) -> None:
    """Send `data` a byte at a time, as a slowloris client would, until the gateway closes."""
    with contextlib.suppress(OSError):
        for byte in data:
            sock.sendall(bytes([byte]))
            time.sleep(every_s)


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_request_dripped_too_slowly_gets_408_and_the_connection_closes(
    start_gateway: GatewayFactory, stub: StubWorker, part: str
) -> None:
    gw = start_gateway(request_read_timeout_s=0.5)
    gw.add_worker(stub)
    request = _request(_body())
    sent_at_once = request.index(b"\r\n") if part == "head" else request.index(b"\r\n\r\n") + 4
    with _connect(gw) as sock:
        sock.sendall(request[:sent_at_once])
        dripping = threading.Thread(target=_drip, args=(sock, request[sent_at_once:], 0.2))
        dripping.start()
        raw = _read_to_eof(sock)  # the gateway answers, then closes
        dripping.join()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout"
    assert "0.5 s" in error["message"]
    assert stub.count == 0


def test_a_keep_alive_connection_may_wait_between_requests_longer_than_the_read_timeout(
    start_gateway: GatewayFactory, stub: StubWorker
) -> None:
    gw = start_gateway(request_read_timeout_s=0.5)
    gw.add_worker(stub)
    with _connect(gw) as sock:
        sock.sendall(_request(_body()))
        first = sock.recv(65536)
        time.sleep(1.6)  # longer than the read timeout and a sweep, shorter than keep-alive
        sock.sendall(_request(_body(), extra=b"connection: close\r\n"))
        responses = _responses(first + _read_to_eof(sock))
    assert [head.split(b"\r\n")[0] for head, _ in responses] == [b"HTTP/1.1 200 OK"] * 2
    assert stub.count == 2


def test_a_request_begun_during_a_long_stream_gets_its_408_only_after_the_stream(
    start_gateway: GatewayFactory, stub: StubWorker
) -> None:
    gw = start_gateway(request_read_timeout_s=0.5)
    gw.add_worker(stub)
    stub.events, stub.event_interval_s = 6, 0.2  # a stream of over a second: two read timeouts
    with _connect(gw) as sock:
        sock.sendall(_request(_body(stream=True)) + b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n")
        raw = _read_to_eof(sock)  # the second request never finishes: 408, then closed
    assert _status_lines(raw) == [b"HTTP/1.1 200 OK", b"HTTP/1.1 408 Request Timeout"]
    stream, _, timeout = raw.partition(b"\r\n0\r\n\r\nHTTP/1.1 408")  # the stream's last chunk, then the 408
    assert timeout and b"data: [DONE]" in stream
    assert stub.count == 1


def test_a_body_still_dripping_after_its_answer_gets_no_second_answer(
    start_gateway: GatewayFactory, stub: StubWorker
) -> None:
    gw = start_gateway(api_keys=["sk-right"], request_read_timeout_s=0.5)
    gw.add_worker(stub)
    request = _request(_body())  # no key: answered 401 from its head alone
    sent_at_once = request.index(b"\r\n\r\n") + 4
    with _connect(gw) as sock:
        sock.sendall(request[:sent_at_once])
        dripping = threading.Thread(target=_drip, args=(sock, request[sent_at_once:], 0.2))
        dripping.start()
        raw = _read_to_eof(sock)  # at the read timeout the gateway closes
        dripping.join()
    assert _status_lines(raw) == [b"HTTP/1.1 401 Unauthorized"]
    assert stub.count == 0


# --- framing as an attacker sees it ------------------------------------------------------------


def _status_lines(raw: bytes) -> list[bytes]:
    return [line for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.")]


def _refused_whole(gateway: GatewayHandle, stub: StubWorker, raw_request: bytes) -> dict[str, object]:
    """Send `raw_request`: exactly one 400 in the OpenAI shape, the connection closed, no worker reached."""
    with _connect(gateway) as sock:
        sock.sendall(raw_request)
        raw = _read_to_eof(sock)
    assert _status_lines(raw) == [b"HTTP/1.1 400 Bad Request"], raw
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert stub.count == 0
    return error


def test_h2c_upgrade_with_a_chunked_body_is_one_request_answered_once(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    body = _body(max_tokens=7)
    smuggled = b"GET /v1/models HTTP/1.1\r\nhost: gw\r\n\r\n"
    with _connect(gateway) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
            b"http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) + smuggled
        )
        raw = _read_to_eof(sock)  # answered, then closed: the bytes after the body are never read
    assert _status_lines(raw) == [b"HTTP/1.1 200 OK"], raw
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["object"] == "chat.completion"
    assert [json.loads(b)["max_tokens"] for b in stub.bodies] == [7]


def test_h2c_upgrade_with_a_length_keeps_its_body_and_nothing_after_it_is_a_request(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    body = _body(max_tokens=9)
    with _connect(gateway) as sock:
        sock.sendall(
            _request(body, extra=b"connection: Upgrade\r\nupgrade: h2c\r\n") + _request(_body(max_tokens=1))
        )
        raw = _read_to_eof(sock)
    assert _status_lines(raw) == [b"HTTP/1.1 200 OK"], raw
    assert [json.loads(b)["max_tokens"] for b in stub.bodies] == [9]


def test_upgrade_without_a_body_is_answered_as_http_1_1_then_closed(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        sock.sendall(
            _get(b"/health", extra=b"connection: Upgrade\r\nupgrade: websocket\r\n") + _get(b"/health")
        )
        raw = _read_to_eof(sock)
    assert _status_lines(raw) == [b"HTTP/1.1 200 OK"], raw
    assert b"connection: close" in raw.lower()


def test_h2c_upgrade_with_a_malformed_chunked_body_is_refused_whole(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    error = _refused_whole(
        gateway,
        stub,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: Upgrade\r\nupgrade: h2c\r\n"
        b"transfer-encoding: chunked\r\n\r\nnot-a-size\r\n{}\r\n0\r\n\r\n",
    )
    assert error["code"] == "malformed_http" and error["message"]


def test_bytes_sent_after_a_declined_upgrades_body_are_dropped_while_its_answer_streams(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    stub.events, stub.event_interval_s = 4, 0.1
    with _connect(gateway) as sock:
        sock.sendall(_request(_body(stream=True), extra=b"connection: Upgrade\r\nupgrade: h2c\r\n"))
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(_request(_body(max_tokens=1)) + b"NOT HTTP AT ALL\r\n\r\n")  # mid-stream
        raw = first + _read_to_eof(sock)
    assert _status_lines(raw) == [b"HTTP/1.1 200 OK"], raw
    assert raw.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert stub.count == 1


def test_content_length_with_transfer_encoding_is_refused_whole(
    gateway: GatewayHandle, stub: StubWorker
) -> None:
    body = _body()
    _refused_whole(
        gateway,
        stub,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n"
        b"transfer-encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(body), len(body), body),
    )


@pytest.mark.parametrize("second", [b"5", b"%d"])
def test_two_content_lengths_are_refused_whole(
    gateway: GatewayHandle, stub: StubWorker, second: bytes
) -> None:
    body = _body()
    lengths = b"content-length: %d\r\ncontent-length: " % len(body) + (
        second % len(body) if b"%" in second else second
    )
    _refused_whole(
        gateway, stub, b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n" + lengths + b"\r\n\r\n" + body
    )


def test_a_folded_header_is_refused_whole(gateway: GatewayHandle, stub: StubWorker) -> None:
    body = _body()
    _refused_whole(gateway, stub, _request(body, extra=b"x-note: one\r\n two\r\n"))


@pytest.mark.parametrize(
    "raw_request",
    [
        b"POST /v1/chat/completions HTTP/1.1\nhost: gw\ncontent-length: 2\n\n{}",
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\ncontent-length: 2\r\n\r\n{}",
    ],
    ids=["bare-lf-everywhere", "bare-lf-in-a-header"],
)
def test_bare_lf_line_endings_are_refused_whole(
    gateway: GatewayHandle, stub: StubWorker, raw_request: bytes
) -> None:
    _refused_whole(gateway, stub, raw_request)


def test_two_host_headers_are_refused_whole(gateway: GatewayHandle, stub: StubWorker) -> None:
    error = _refused_whole(gateway, stub, _request(_body(), extra=b"host: other\r\n"))
    assert error["code"] == "duplicate_header"


def test_two_authorization_headers_are_refused_even_when_one_is_right(
    start_gateway: GatewayFactory, stub: StubWorker
) -> None:
    gw = start_gateway(api_keys=["sk-right"])
    gw.add_worker(stub)
    with _connect(gw) as sock:
        sock.sendall(
            _request(
                _body(),
                extra=b"authorization: Bearer sk-wrong\r\nauthorization: Bearer sk-right\r\n"
                b"connection: close\r\n",
            )
        )
        ((head, body),) = _responses(_read_to_eof(sock))
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "duplicate_header"
    assert stub.count == 0


def test_an_absolute_form_target_is_routed_like_its_path(gateway: GatewayHandle, stub: StubWorker) -> None:
    body = _body()
    with _connect(gateway) as sock:
        sock.sendall(_request(body, extra=b"connection: close\r\n").replace(CHAT, b"http://gw" + CHAT, 1))
        ((head, answer),) = _responses(_read_to_eof(sock))
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(answer)["object"] == "chat.completion"
    assert stub.received[0].path == "/v1/chat/completions"


def test_every_answer_carries_a_date(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        sock.sendall(_request(_body(model="nobody-serves-it"), extra=b"connection: close\r\n"))
        ((head, _),) = _responses(_read_to_eof(sock))
    date = next(line for line in head.split(b"\r\n") if line.lower().startswith(b"date:"))
    time.strptime(date.split(b":", 1)[1].strip().decode(), "%a, %d %b %Y %H:%M:%S GMT")


# --- the worker's side: an answer delimited by closing the connection --------------------------


def test_a_workers_close_delimited_answer_is_relayed_whole_and_counts_as_success(
    start_gateway: GatewayFactory,
) -> None:
    reply = json.dumps(
        {"object": "chat.completion", "choices": [{"message": {"content": "x" * 5000}}]}
    ).encode()
    worker = RawWorker(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + reply
    )
    gw = start_gateway(eject_after_failures=1)
    with worker.running():
        gw.add_worker(worker.url)
        for _ in range(3):  # a failure would have ejected the worker after the first
            with _connect(gw) as sock:
                sock.sendall(_request(_body(), extra=b"connection: close\r\n"))
                ((head, answer),) = _responses(_read_to_eof(sock))
            assert head.startswith(b"HTTP/1.1 200")
            assert answer == reply
    assert len(worker.requests) == 3
    assert gw.state.fleet.ejector.ejected() == []


def test_a_workers_close_delimited_stream_reaches_the_client_complete(start_gateway: GatewayFactory) -> None:
    events = b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    worker = RawWorker(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n" + events)
    gw = start_gateway()
    with worker.running():
        gw.add_worker(worker.url)
        with httpx.Client(timeout=10) as http:
            resp = http.post(gw.url + "/v1/chat/completions", content=_body(stream=True))
    assert resp.status_code == 200
    assert resp.content == events


def test_a_large_body_over_the_limit_is_read_to_its_end_so_the_client_sees_the_413(
    start_gateway: GatewayFactory, stub: StubWorker
) -> None:
    """Without `Expect: 100-continue` the client sends its whole body before it reads:
    closing with the body unread would reset the connection, and the 413 with it."""
    gw = start_gateway(max_body_bytes=1024)
    gw.add_worker(stub)
    body = _body(padding="x" * (4 * 1024 * 1024))  # far beyond what the sockets buffer
    with contextlib.closing(_connect(gw)) as sock:
        sock.sendall(_request(body))  # a reset here would be a BrokenPipeError
        raw = _read_to_eof(sock)
    answer = _Answer(raw)
    assert answer.status == 413 and answer.complete
    assert answer.headers[b"connection"] == b"close"
    assert json.loads(answer.body)["error"]["code"] == "request_too_large"
    assert stub.count == 0
