"""uvicorn's httptools protocol, with the protections a public gateway needs on top.

uvicorn (llhttp underneath) does HTTP/1.1's framing: CL+TE, two `Content-Length`s, folded
headers, bare LF, pipelining, `Expect: 100-continue`, absolute-form targets, `Date`. This
subclass adds only what it lacks, each answered in the OpenAI error shape:

- **A deadline for the whole request** (`read_timeout_s`, head and body, from its first
  byte): a client that drips it byte by byte gets `408 request_timeout` and is closed.
  Idle keep-alive connections are uvicorn's `timeout_keep_alive`.
- **A bound on the head** (`max_head_bytes`, request line and headers): `431`.
- **One `Host` header**, as RFC 9112 §3.2 requires: `400` otherwise.
- **Declined upgrades keep their body.** uvicorn drops the body of a request carrying
  `Upgrade:` (llhttp stops at its head), and the bytes after it are never read. Here an
  upgrade to anything (h2c included: the gateway speaks HTTP/1.1) is declined: the request
  is answered as HTTP/1.1 with its body (length-delimited or chunked, parsed by a second
  llhttp parser), and the connection closes after that answer, so nothing that follows
  the body can be taken for another request.
- **Malformed requests** get uvicorn's `400`, with an OpenAI error body.
- **No chunking for HTTP/1.0 clients** (RFC 9112 §6.1: they cannot read it): an answer of
  unknown length, a stream, is delimited by closing the connection instead.

It relies on `HttpToolsProtocol`'s attributes (`parser`, `cycle`, `transport`, `pipeline`),
stable across uvicorn 0.30-0.54 and covered by tests/unit/test_http_framing.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn._types import ASGISendEvent
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from vpool.errors import InvalidRequest, VpoolError

REJECT_LINGER_S = 2.0
MAX_DISCARD_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ProtocolLimits:
    read_timeout_s: float = 60.0
    max_head_bytes: int = 256 * 1024


class _Refused(Exception):
    """Raised from a parser callback: answer `error` and close."""

    def __init__(self, error: VpoolError) -> None:
        super().__init__(error.message)
        self.error = error


def make_protocol(limits: ProtocolLimits) -> type[GatewayHttpProtocol]:
    """The protocol class for uvicorn's `Config(http=...)`, with these limits."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,), {"limits": limits})


class GatewayHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[ProtocolLimits] = ProtocolLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = False  # between a request's first byte and its last
        self._reading_head = False
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._declined: _DeclinedUpgradeBody | None = None  # the raw body of a declined upgrade
        self._done_reading = False  # answered for good: what the client still sends is dropped
        self._discarded = 0

    # reading

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._done_reading:
            self._discarded += len(data)
            if self._discarded > MAX_DISCARD_BYTES:
                self.transport.close()
            return
        if self._declined is not None:
            self._declined.feed(data)
        else:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
                self._upgrade_declined(data[offset:])
            except httptools.HttpParserError as exc:
                refused = exc.__context__
                if isinstance(refused, _Refused):
                    self._refuse(400, refused.error)
                else:
                    self.send_400_response("Malformed HTTP request.")
                return
        if self._reading and not self._done_reading:
            self._read_unfinished(len(data))

    def _read_unfinished(self, size: int) -> None:
        """This read ended inside a request: start its deadline, and bound its head.

        Most requests arrive in one read and never get here, so they cost no timer.
        """
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._too_slow)
        if self._reading_head:
            self._head_bytes += size
            if self._head_bytes > self.limits.max_head_bytes:
                error = InvalidRequest(
                    "The request line and headers are too large.", code="headers_too_large"
                )
                self._refuse(431, error, linger=True)  # it is still sending: let it read the 431

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading = True
        self._reading_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if sum(1 for name, _ in self.headers if name == b"host") > 1:
            raise _Refused(InvalidRequest("Send one Host header, not several.", code="duplicate_header"))
        super().on_headers_complete()
        if self.scope["http_version"] == "1.0":
            # The ASGI task starts on the next loop turn, so its `send` is already this class's.
            self.cycle.__class__ = _Http10Cycle
        if self.parser.should_upgrade():
            # Declined (uvicorn serves no WebSocket here): answered as plain HTTP/1.1, then closed.
            self.cycle.keep_alive = False
            declared = _body_framing(self.headers)
            if declared is not None:
                self._declined = _DeclinedUpgradeBody(self, declared)

    def on_message_complete(self) -> None:
        if self._declined is not None:
            return  # an upgrade request's body follows, raw: see _DeclinedUpgradeBody
        self._reading = False
        self._cancel_deadline()
        super().on_message_complete()

    # the declined upgrade's body

    def _upgrade_declined(self, rest: bytes) -> None:
        if self._declined is None:
            self._done_reading = True  # no body: the answer comes, then the connection closes
        elif rest:
            self._declined.feed(rest)

    def declined_body_complete(self) -> None:
        self._declined = None
        self._reading = False
        self._done_reading = True
        self._cancel_deadline()
        super().on_message_complete()

    def declined_body_malformed(self) -> None:
        self._declined = None
        self._refuse(400, InvalidRequest("Malformed HTTP request body.", code="malformed_http"))

    # answering what the app never sees

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, InvalidRequest(msg, code="malformed_http"))

    def _too_slow(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.pipeline or (cycle is not None and cycle.response_started and not cycle.response_complete):
            # An earlier answer is still going out: a 408 now would land inside it.
            self._deadline = self.loop.call_later(self.limits.read_timeout_s, self._too_slow)
            return
        if cycle is not None and not self._reading_head and cycle.response_complete:
            self.transport.close()  # answered already (say, a 401), and the body still drips
            return
        if cycle is not None and not self._reading_head:
            cycle.disconnected = True  # the app waiting for this body gives up
            cycle.message_event.set()
        timeout = self.limits.read_timeout_s
        self._refuse(
            408, InvalidRequest(f"The request did not arrive within {timeout:g} s.", code="request_timeout")
        )

    def _refuse(self, status: int, error: VpoolError, linger: bool = False) -> None:
        """Answer a request the app will not see, then close the connection.

        With `linger`, what the client is still sending is read and dropped for a while
        first: closing with unread input resets the connection, and the answer is lost.
        """
        self._cancel_deadline()
        self._done_reading = True
        if self.transport.is_closing():
            return
        body = error.json()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(
            b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(b"".join(head) + body)
        if linger:
            self.loop.call_later(REJECT_LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


def _body_framing(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The header that frames a request's body, as a line to prime a parser; None: no body."""
    for name, value in headers:
        if name == b"transfer-encoding":
            return b"transfer-encoding: " + value
        if name == b"content-length" and value.strip() not in (b"", b"0"):
            return b"content-length: " + value
    return None


class _DeclinedUpgradeBody:
    """Parses the body llhttp left raw behind an `Upgrade:` head, with llhttp itself: a
    second parser primed with a head that frames the body the same way."""

    def __init__(self, protocol: GatewayHttpProtocol, framing: bytes) -> None:
        self._protocol = protocol
        self._complete = False  # what follows the body is never parsed as anything
        self._parser = httptools.HttpRequestParser(self)
        self._parser.feed_data(b"POST / HTTP/1.1\r\nhost: body\r\n" + framing + b"\r\n\r\n")

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._complete:
                self._protocol.declined_body_malformed()

    def on_body(self, body: bytes) -> None:
        if not self._complete:
            self._protocol.on_body(body)

    def on_message_complete(self) -> None:
        if not self._complete:
            self._complete = True
            self._protocol.declined_body_complete()


class _Http10Cycle(RequestResponseCycle):
    """uvicorn's request cycle, but an answer with no `content-length` to an HTTP/1.0 client
    ends when the connection closes, instead of in chunks it cannot read."""

    _until_close = False

    async def send(self, message: ASGISendEvent) -> None:
        if self.disconnected:
            return
        if message["type"] == "http.response.start" and not self.response_started:
            headers = list(message.get("headers", []))
            sized = any(name.lower() == b"content-length" for name, _ in headers)
            if not sized and self.scope["method"] != "HEAD" and message["status"] not in (204, 304):
                self._until_close = True
                self.keep_alive = False
                self.response_started = True
                self.waiting_for_100_continue = False
                head = [STATUS_LINE[message["status"]]]
                for name, value in [*self.default_headers, *headers, (b"connection", b"close")]:
                    head += [name, b": ", value, b"\r\n"]
                head.append(b"\r\n")
                self.transport.write(b"".join(head))
                return
        if not self._until_close:
            await super().send(message)
            return
        if message["type"] != "http.response.body" or self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message {message['type']!r} for this answer.")
        if self.flow.write_paused:
            await self.flow.drain()
        self.transport.write(message.get("body", b""))
        if not message.get("more_body", False):
            self.response_complete = True
            self.message_event.set()
            self.transport.close()
            self.on_response()
