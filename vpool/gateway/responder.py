"""An exchange's answer, written through ASGI `send`; the client's departure, noticed.

The proxy works by callbacks from the worker's connection (vpool/gateway/proxy.py); ASGI
writes by awaiting `send`. `AsgiResponder` is the bridge: the exchange's callbacks queue
what to send and wake one writer coroutine, the request's own task, which sends the
response head, then everything one worker read brought as one body message (one write to
the client). Nothing is re-framed: the worker's bytes are the body, uvicorn adds only the
HTTP framing.

- **Back-pressure.** uvicorn's `send` waits while the client's socket is backed up. When
  the worker sends more meanwhile, the exchange is paused (it stops reading the worker, and
  its timeouts stop counting: the silence is ours) until the client has caught up.
- **Departure.** A second coroutine waits on `receive` for `http.disconnect` and cancels
  the exchange at once, which drops the worker connection: vLLM aborts the request. It is
  started only for answers still under way after `WATCH_AFTER_S`: most answers of a fast
  worker are done sooner, and a task per request was a tenth of the gateway's time.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Send

from vpool.gateway.proxy import Interruptible

JSON = b"application/json"
WATCH_AFTER_S = 0.05


class AsgiResponder:
    """Implements the proxy's `Client` over ASGI; `run` sends until the answer is complete."""

    __slots__ = (
        "_chunks", "_closed", "_ended", "_head_sent", "_loop", "_paused", "_send", "_sending", "_start",
        "_wake", "_watcher", "work",
    )  # fmt: skip

    def __init__(self, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        # The loop is given, not looked up: on Python 3.11 `asyncio.get_running_loop()` makes
        # a getpid() system call, a measurable cost twice per request.
        self._loop = loop
        self._send = send
        self._start: Message | None = None  # a response head not sent yet
        self._chunks: list[bytes] = []
        self._ended = False  # the exchange has given the whole answer
        self._closed = False  # the exchange wants the connection dropped
        self._sending = False
        self._head_sent = False
        self._paused = False
        self._wake: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.work: Interruptible | None = None

    # the exchange's side (called from upstream callbacks; never blocks)

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = JSON,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        head = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
        if headers:
            head += headers
        self._start = {"type": "http.response.start", "status": status, "headers": head}
        self._chunks.append(body)
        self._ended = True
        self._wake_writer()

    def start_stream(
        self, status: int, content_type: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        head = [(b"content-type", content_type)]
        if headers:
            head += headers
        self._start = {"type": "http.response.start", "status": status, "headers": head}

    def write_chunk(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)

    def flush(self) -> None:
        if self._sending:
            # The client is behind: hold the worker until it has caught up.
            if not self._paused and self.work is not None:
                self._paused = True
                self.work.pause()
            return
        self._wake_writer()

    def end_stream(self) -> None:
        self._ended = True
        self._wake_writer()

    def close(self) -> None:
        self._closed = True
        self._wake_writer()

    # the request task's side

    async def run(self, receive: Receive) -> None:
        """Send the answer as the exchange produces it; return once it is complete, the
        client has left, or the exchange dropped the connection."""
        timer = self._loop.call_later(WATCH_AFTER_S, self._start_watching, receive)
        try:
            await self._write_all()
        finally:
            timer.cancel()
            if self._watcher is not None:
                self._watcher.cancel()
            self.work = None

    def _start_watching(self, receive: Receive) -> None:
        if not (self._ended or self._closed):
            self._watcher = self._loop.create_task(self._watch_departure(receive))

    async def _write_all(self) -> None:
        send = self._send
        while True:
            if not (self._start or self._chunks or self._ended or self._closed):
                self._wake = self._loop.create_future()
                await self._wake
            if self._closed:
                return  # uvicorn closes a connection whose answer was left unfinished
            start, self._start = self._start, None
            if start is not None:
                self._head_sent = True
                await send(start)
            chunks = self._chunks
            if chunks:
                self._chunks = []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                last = self._ended and not self._chunks
                self._sending = True
                try:
                    await send({"type": "http.response.body", "body": data, "more_body": not last})
                finally:
                    self._sending = False
                if self._paused and self.work is not None:
                    self._paused = False
                    self.work.resume()
                if last:
                    return
            elif self._ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return

    async def _watch_departure(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # Also how uvicorn says the answer is complete: then there is nothing to cancel.
        if not self._ended and self.work is not None:
            self.work.cancel()
        self._closed = True
        self._wake_writer()

    @property
    def started(self) -> bool:
        """Whether the answer's head has gone out (an error can no longer replace it)."""
        return self._head_sent

    def _wake_writer(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        self._wake = None


async def send_whole(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete JSON answer that needs no exchange (an error found before routing)."""
    head = [(b"content-type", JSON), (b"content-length", b"%d" % len(body))]
    if headers:
        head += headers
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})
