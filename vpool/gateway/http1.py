"""The gateway's client side: HTTP/1.1 on an asyncio protocol with httptools' parser.

Why not uvicorn and an ASGI app: on one core in front of a stub backend, the ASGI message
round trips and per-request tasks held a proxy to under half the throughput of this
(benchmarks/README.md). This module only frames HTTP: it parses requests (keep-alive,
pipelining, `Expect: 100-continue`, a body-size limit), hands each complete one to the
gateway's handler and writes what the handler answers. It knows nothing of OpenAI.
"""

from __future__ import annotations

import asyncio
import http
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import httptools

log = logging.getLogger("vpool.gateway")

_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
MAX_PIPELINED = 16
MAX_DISCARD_BYTES = 16 * 1024 * 1024
REJECT_LINGER_S = 2.0
MAX_HEAD_BYTES = 256 * 1024  # request line and headers, give or take one read


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


@dataclass(slots=True)
class IncomingRequest:
    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes = b""
    keep_alive: bool = True
    http_1_0: bool = False


class RequestHandler(Protocol):
    """Answers one request through the connection: `respond`, or `start_stream` … `end_stream`."""

    def __call__(self, request: IncomingRequest, conn: ClientConnection) -> None: ...


class Interruptible(Protocol):
    """The work behind a response, told when the client goes or the socket backs up."""

    def cancel(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


@dataclass(frozen=True)
class ConnectionLimits:
    """The body limit, and the error answers for requests a connection will not read
    (supplied by the gateway, which knows the error format)."""

    max_body_bytes: int
    read_timeout_s: float  # for a whole request, head and body, from its first byte
    too_slow: bytes  # the 408's body
    too_large: Callable[[int], tuple[int, bytes]]
    bad_request: bytes
    head_too_large: bytes


class ClientConnection(asyncio.Protocol):
    def __init__(
        self,
        handler: RequestHandler,
        limits: ConnectionLimits,
        registry: set[ClientConnection],
    ) -> None:
        self._handler = handler
        self._limits = limits
        self._registry = registry
        self._parser = httptools.HttpRequestParser(self)
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.last_active = self._loop.time()
        # The request being parsed, the one being answered, those waiting behind it.
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._rejected = False
        self._discarded = 0
        self._head_bytes = 0  # of the request being parsed, until its headers are complete
        self._reading_head = False
        self._reading_since: float | None = None  # the request being read: its first byte
        self._last_request_read = False  # a `Connection: close` request: read nothing after it
        self._awaiting_body: IncomingRequest | None = None  # an `Upgrade:` request's raw body
        self._raw_body_left = 0
        self._current: IncomingRequest | None = None
        self._pending: deque[IncomingRequest] = deque()
        self._streaming_chunked = False
        self._out: list[bytes] = []  # stream output held until `flush`: one write per upstream read
        self.work: Interruptible | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self._loop.time()
        if self._awaiting_body is not None:
            data = self._take_raw_body(data)
            if not data:
                return
        if self._rejected or self._last_request_read:
            # Read what the client still sends, so it sees our answer rather than a reset.
            self._discarded += len(data)
            if self._discarded > MAX_DISCARD_BYTES:
                self.close()
            return
        try:
            self._parser.feed_data(data)
            if self._reading_head:  # this read ended inside a request's head: bound it
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._reject(431, self._limits.head_too_large)
        except httptools.HttpParserUpgrade as exc:
            # `Upgrade: h2c` and the like: answered as HTTP/1.1, which declines the upgrade.
            # The parser stopped after the head; a body, if any, follows raw.
            self._parser = httptools.HttpRequestParser(self)
            rest = data[exc.args[0] :] if exc.args and isinstance(exc.args[0], int) else b""
            if rest:
                self.data_received(rest)
        except httptools.HttpParserError:
            if not self._last_request_read:  # else: bytes after `Connection: close`, ignored
                self._reject(400, self._limits.bad_request, close_now=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._registry.discard(self)
        self._pending.clear()
        work, self.work = self.work, None
        if work is not None:
            work.cancel()

    def pause_writing(self) -> None:
        if self.work is not None:
            self.work.pause()

    def resume_writing(self) -> None:
        if self.work is not None:
            self.work.resume()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._reading_head = True
        self._reading_since = self._loop.time()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._head_bytes = 0
        declared = self._headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limits.max_body_bytes:
            self._reject(*self._limits.too_large(self._limits.max_body_bytes))
            return
        expects = self._headers.get(b"expect", b"").lower() == b"100-continue"
        # Behind a pipelined request the 100 would land inside that request's answer; a
        # client that gets none sends its body after a short wait anyway.
        if expects and self.transport and self._current is None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes:
            self._reject(*self._limits.too_large(self._limits.max_body_bytes))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._reading_since = None
        if self._rejected:
            self.close()  # the client has sent it all and has our answer
            return
        parser = self._parser
        request = IncomingRequest(
            method=parser.get_method(),
            path=self._url.split(b"?", 1)[0],
            headers=self._headers,
            body=b"".join(self._body) if len(self._body) != 1 else self._body[0],
            keep_alive=parser.should_keep_alive(),
            http_1_0=parser.get_http_version() == "1.0",
        )
        self._body = []
        self._url = b""
        if parser.should_upgrade() and self._upgrade_body_left(request):
            # llhttp stops at the head of an `Upgrade:` request: its body comes raw.
            self._awaiting_body = request
            return
        self._accept(request)

    def _upgrade_body_left(self, request: IncomingRequest) -> bool:
        declared = request.headers.get(b"content-length", b"0")
        self._raw_body_left = int(declared) if declared.isdigit() else 0
        return self._raw_body_left > 0

    def _accept(self, request: IncomingRequest) -> None:
        if not request.keep_alive:
            self._last_request_read = True
        if self._current is None:
            self._dispatch(request)
        else:
            self._pending.append(request)
            if len(self._pending) >= MAX_PIPELINED and self.transport:
                self.transport.pause_reading()

    def _take_raw_body(self, data: bytes) -> bytes:
        """Feed an upgrade request's body; what follows it is the next request."""
        request = self._awaiting_body
        assert request is not None
        part, rest = data[: self._raw_body_left], data[self._raw_body_left :]
        request.body += part
        self._raw_body_left -= len(part)
        if self._raw_body_left == 0:
            self._awaiting_body = None
            self._accept(request)
        return rest

    # answering

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """A whole response in one write."""
        if self.closed or self.transport is None:
            self._finish()
            return
        current = self._current
        keep_alive = current is not None and current.keep_alive
        head = [status_line(status), b"content-type: ", content_type, b"\r\ncontent-length: ",
                str(len(body)).encode(), b"\r\n"]  # fmt: skip
        if headers:
            for name, value in headers:
                head += (name, b": ", value, b"\r\n")
        if not keep_alive:
            head.append(b"connection: close\r\n")
        elif current is not None and current.http_1_0:
            head.append(b"connection: keep-alive\r\n")
        head.append(b"\r\n")
        if current is None or current.method != b"HEAD":
            head.append(body)
        self.transport.write(b"".join(head))
        self._finish()

    def start_stream(
        self, status: int, content_type: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Begin a response whose length is unknown: chunked (HTTP/1.0: until close).

        Stream output is held until `flush` (or the stream's end), so that what one upstream
        read brought (head, events, even the end) leaves in one write.
        """
        if self.closed or self.transport is None:
            return
        current = self._current
        self._streaming_chunked = current is not None and not current.http_1_0
        head = [status_line(status), b"content-type: ", content_type, b"\r\n"]
        if headers:
            for name, value in headers:
                head += (name, b": ", value, b"\r\n")
        if self._streaming_chunked:
            head.append(b"transfer-encoding: chunked\r\n")
            if current is not None and not current.keep_alive:
                head.append(b"connection: close\r\n")
        else:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self._out.append(b"".join(head))

    def write_chunk(self, data: bytes) -> None:
        if self.closed or not data:
            return
        if self._streaming_chunked:
            self._out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._out.append(data)

    def flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            if not self.closed and self.transport is not None:
                self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def end_stream(self) -> None:
        if not self.closed and self.transport is not None:
            if self._streaming_chunked:
                self._out.append(b"0\r\n\r\n")
                self.flush()
            else:
                self.flush()
                self._current = None
                self.transport.close()
        self._out = []
        self._finish()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    @property
    def idle(self) -> bool:
        return self._current is None and not self._pending

    def expire_slow_request(self, now: float) -> None:
        """Answer 408 and close if the request being read is overdue (a dripping client)."""
        since = self._reading_since
        if since is None or self._rejected or self._current is not None:
            return  # nothing being read, or an answer under way that a 408 would corrupt
        if now - since > self._limits.read_timeout_s:
            self._reject(408, self._limits.too_slow, close_now=True)

    # internals

    def _dispatch(self, request: IncomingRequest) -> None:
        self._current = request
        try:
            self._handler(request, self)
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.path)
            if self._current is request:
                self.respond(500, b'{"error":{"message":"The server had an internal error.",'
                                  b'"type":"server_error","param":null,"code":null}}')  # fmt: skip

    def _finish(self) -> None:
        """The current response is complete: close, or answer the next pipelined request."""
        current, self._current = self._current, None
        self.work = None
        self.last_active = self._loop.time()
        if self.closed or self.transport is None:
            return
        if current is not None and not current.keep_alive:
            self.transport.close()
            return
        if self._pending:
            # On the next loop turn: answering a queue of pipelined requests one inside the
            # other would recurse as deep as the queue.
            self._loop.call_soon(self._dispatch_next)

    def _dispatch_next(self) -> None:
        if self.closed or self._current is not None or not self._pending:
            return
        if len(self._pending) == MAX_PIPELINED and self.transport is not None:
            self.transport.resume_reading()
        self._dispatch(self._pending.popleft())

    def _reject(self, status: int, body: bytes, close_now: bool = False) -> None:
        """A request we will not read: answer it, parse nothing more, close."""
        self._rejected = True
        self._pending.clear()
        if self.transport is None or self.closed:
            return
        if self._current is None:
            self.transport.write(
                status_line(status) + b"content-type: application/json\r\ncontent-length: "
                + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
            )  # fmt: skip
        if close_now or self._current is not None:
            self.transport.close()
        else:
            # Closing with unread input would reset the connection and lose the answer.
            self._loop.call_later(REJECT_LINGER_S, self.close)
