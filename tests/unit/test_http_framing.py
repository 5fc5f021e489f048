"""HTTP/1.1 as raw clients speak it to the gateway: what SDKs hide, framing byte by byte."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

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


def test_keep_alive_connection_serves_requests_one_after_another(gateway: GatewayHandle) -> None:
    with _connect(gateway) as sock:
        for _ in range(3):
            sock.sendall(_request(_body()))
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += sock.recv(65536)
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
