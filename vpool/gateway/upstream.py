"""Keep-alive HTTP/1.1 connections to workers: one idle pool per worker origin.

A small client on asyncio protocols and httptools' response parser. Each response event
is a callback straight into the exchange that owns the connection, so a relayed chunk
costs one parse and one write: no task, queue or stream object per request or per chunk.
Measured on one core in front of the stub backend (benchmarks/README.md): httpx's pool
spent two thirds of the gateway's time in its own bookkeeping, aiohttp reached under half
of what this does.

An answer with neither `content-length` nor chunking is delimited by the worker closing
the connection (RFC 9112 §6.3): it ends, complete, when the connection does. httptools
cannot be told the input ended, so this module says so itself.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httptools


class ResponseSink(Protocol):
    """Who receives a response: the exchange that sent the request."""

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_lost(self, exc: Exception) -> None: ...
    def on_read_done(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a worker listens, parsed once from its URL."""

    host: str
    port: int
    tls: bool
    host_header: bytes
    base_path: bytes

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = parts.hostname or "127.0.0.1"
        return cls(host, port, tls, parts.netloc.encode(), parts.path.rstrip("/").encode())


class UpstreamConnection(asyncio.Protocol):
    """One connection to a worker; serves one request at a time for its current sink."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.closed = False
        self.used = False  # has carried a request before: a failure may be a stale keep-alive
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[bytes, bytes] = {}
        self._until_close = False  # the answer under way ends when the worker closes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data: bytes, sink: ResponseSink) -> None:
        assert self.transport is not None
        self.sink = sink
        self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection at once (the worker sees the client go and aborts the request)."""
        self.closed = True
        self.sink = None
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # asyncio and httptools callbacks

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._lost(ConnectionError(f"malformed response from worker: {exc}"))
            self.abort()
        if sink is not None:
            sink.on_read_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._until_close and exc is None:
            self.on_message_complete()  # a close-delimited answer: complete now
            return
        self._lost(exc or ConnectionResetError("the worker closed the connection"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        headers = self._headers
        self._until_close = (
            b"content-length" not in headers
            and b"transfer-encoding" not in headers
            and status >= 200
            and status not in (204, 304)
        )
        if self.sink is not None:
            self.sink.on_head(status, headers)
        self._headers = {}

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.on_body(body)

    def on_message_complete(self) -> None:
        sink, self.sink = self.sink, None
        self.used = True
        if self._until_close:
            self._until_close = False
            self.closed = True
        elif not self._parser.should_keep_alive():
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        if sink is not None:
            sink.on_end()

    def _lost(self, exc: Exception) -> None:
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_lost(exc)


class UpstreamPool:
    """Idle keep-alive connections per worker origin, newest first (most likely alive)."""

    def __init__(self, connect_timeout_s: float, max_idle_per_origin: int = 512) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle_per_origin
        self._idle: dict[Origin, deque[UpstreamConnection]] = {}
        self._ssl = ssl.create_default_context()

    def take_idle(self, origin: Origin) -> UpstreamConnection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def connect(self, origin: Origin, timeout_s: float | None = None) -> UpstreamConnection:
        """A new connection; OSError or TimeoutError when the worker cannot be reached.

        `timeout_s` replaces the pool's connect timeout (a model may have its own).
        """
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(
                UpstreamConnection,
                origin.host,
                origin.port,
                ssl=self._ssl if origin.tls else None,
            ),
            timeout_s or self._connect_timeout_s,
        )
        return conn

    def release(self, origin: Origin, conn: UpstreamConnection) -> None:
        """Keep a connection whose response ended cleanly for the next request."""
        if conn.closed:
            return
        idle = self._idle.setdefault(origin, deque())
        idle.append(conn)
        if len(idle) > self._max_idle:
            idle.popleft().abort()

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().abort()
        self._idle.clear()


class _StatusSink:
    """Collects one answer's status for `UpstreamPool.status_of` (the body is dropped)."""

    def __init__(self) -> None:
        self.status = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status = status

    def on_body(self, data: bytes) -> None:
        pass

    def on_end(self) -> None:
        if not self.done.done():
            self.done.set_result(self.status)

    def on_lost(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def on_read_done(self) -> None:
        pass


async def status_of(
    pool: UpstreamPool, origin: Origin, method: bytes, target: bytes, timeout_s: float
) -> int | None:
    """One request to a worker off the hot path (a lookup): its status, None if it failed.

    Always on a fresh connection, so that a stale pooled one cannot pass for a worker's "no".
    """
    conn: UpstreamConnection | None = None
    sink = _StatusSink()
    answered = False
    try:
        async with asyncio.timeout(timeout_s):
            conn = await pool.connect(origin, timeout_s)
            conn.send(
                b"%b %b%b HTTP/1.1\r\nhost: %b\r\ncontent-length: 0\r\n\r\n"
                % (method, origin.base_path, target, origin.host_header),
                sink,
            )
            status = await sink.done
            answered = True
    except (OSError, TimeoutError):
        return None
    finally:
        # A lookup cancelled because another worker answered first (response_owners.py)
        # must not leave its connection open behind it.
        if conn is not None and not answered:
            conn.abort()
    pool.release(origin, conn)
    return status
