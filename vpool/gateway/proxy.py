"""Forward a request's original bytes to a worker and its answer back.

One `Exchange` per client request, driven by callbacks from the upstream connection:
- until a byte has reached the client, a failed attempt is tried again on another ready
  replica of the model, after `retry_backoff_s` times the attempts so far, up to
  `max_attempts` in all. A failed attempt is a connection refused, reset or timed out, no
  response head within the first-byte timeout, or a whole 502/503 answer (a worker that is
  draining or overloaded). A pooled keep-alive connection that turns out stale is first
  retried on a fresh connection to the same worker, and that is no new attempt. With no
  attempt or replica left, the client gets the last failure: the worker's own 502/503
  (in the OpenAI error shape), a 504 for a timeout, else a 502;
- an answer with an error status is never streamed: it is read whole, reshaped into the
  OpenAI error body if it is not one, and sent in one write. So a stream's head is only
  forwarded once its status is known not to be retried, and after that nothing is retried;
- a JSON answer is read whole and sent in one write; an event stream is passed through
  chunk by chunk, never re-framed;
- a stream that breaks, or goes quiet for the read timeout, ends with an OpenAI error
  event and no `[DONE]`;
- every attempt's verdict goes to the fleet's `Ejector` (vpool/gateway/ejection.py), which
  takes workers that keep failing out of rotation for a while;
- when the client leaves, the upstream connection is aborted at once: vLLM sees the
  disconnect and aborts the request, freeing its KV cache;
- a request pinned to one worker (a follow-up on a response that worker stores) is never
  retried elsewhere: no other worker could answer it.

Timeouts: the connect timeout is the pool's; the first-byte timeout (until the response
head: for an answer that is not streamed, the whole generation) and the read timeout
(between two reads once the head is in) are checked by one sweep, `Proxy.watch_timeouts`,
a few times a second, rather than a timer per request. Each may be set per model
(`gateway.model_timeouts`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Protocol

from vpool.config import Settings
from vpool.errors import UpstreamError, UpstreamTimeout, VpoolError, ensure_openai_error_body
from vpool.gateway.ejection import Ejector
from vpool.gateway.fleet import Fleet
from vpool.gateway.metering import Charge
from vpool.gateway.metrics import GatewayMetrics
from vpool.gateway.request_body import OpenAIRequest
from vpool.gateway.response_owners import ResponseOwners
from vpool.gateway.sse import error_event
from vpool.gateway.upstream import Origin, UpstreamConnection, UpstreamPool
from vpool.gateway.usage_reading import usage_in
from vpool.registry.records import WorkerRecord

log = logging.getLogger("vpool.gateway")

EVENT_STREAM = b"text/event-stream"
SSE_HEADERS = (b"cache-control", b"no-cache")
# Answers that mean "not this worker, not now": vLLM's server or a proxy in front of it
# when it is overloaded, starting or shutting down. Retried on another worker.
_RETRIED_STATUS_KINDS = {502: "http_502", 503: "http_503"}
# How much of a new response's stream is searched for its id (its first event).
_MAX_FIRST_EVENT = 64 * 1024


class Interruptible(Protocol):
    """The work behind a response, told when the client goes or reads too slowly."""

    def cancel(self) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...


class Client(Protocol):
    """Where an exchange's answer goes (vpool/gateway/responder.py: ASGI `send`).

    `respond` sends a whole answer; a stream is `start_stream`, `write_chunk`s made to leave
    together by `flush`, then `end_stream`; `close` drops the connection mid-answer.
    """

    work: Interruptible | None

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None: ...
    def start_stream(
        self, status: int, content_type: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None: ...
    def write_chunk(self, data: bytes) -> None: ...
    def flush(self) -> None: ...
    def end_stream(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    first_byte_s: float
    read_s: float


def resolve_timeouts(settings: Settings) -> tuple[Timeouts, dict[str, Timeouts]]:
    """The default timeouts and those of each model name with overrides.

    An override keyed by a catalog model's name (or one of its aliases) applies to all the
    names that model is served under; other keys apply to that exact name.
    """
    g = settings.gateway
    default = Timeouts(g.connect_timeout_s, g.first_byte_timeout_s or g.read_timeout_s, g.read_timeout_s)
    served_as = {name: spec.served_names for spec in settings.models for name in spec.served_names}
    by_model: dict[str, Timeouts] = {}
    for key, override in g.model_timeouts.items():
        timeouts = Timeouts(
            override.connect_timeout_s or default.connect_s,
            override.first_byte_timeout_s or default.first_byte_s,
            override.read_timeout_s or default.read_s,
        )
        for name in served_as.get(key, [key]):
            by_model[name] = timeouts
    return default, by_model


class Proxy:
    """What every exchange shares: the fleet view, the connection pool, the metrics."""

    def __init__(
        self,
        pool: UpstreamPool,
        fleet: Fleet,
        metrics: GatewayMetrics,
        max_attempts: int,
        timeouts: Timeouts,
        model_timeouts: Mapping[str, Timeouts] | None = None,
        retry_backoff_s: float = 0.05,
    ) -> None:
        self.pool = pool
        self.fleet = fleet
        self.ejector: Ejector = fleet.ejector
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.timeouts = timeouts
        self.model_timeouts = dict(model_timeouts or {})
        self.response_owners = ResponseOwners(pool)
        self._origins: dict[str, Origin] = {}
        # Exchanges under way, swept for timeouts: cheaper than a timer per request.
        self.active: set[Exchange] = set()

    async def watch_timeouts(self) -> None:
        """End or retry exchanges whose worker has been silent for too long."""
        shortest = min(min(t.first_byte_s, t.read_s) for t in (self.timeouts, *self.model_timeouts.values()))
        interval = min(0.25, shortest / 4)
        while True:
            await asyncio.sleep(interval)
            now = monotonic()
            for exchange in list(self.active):
                exchange.check_timeout(now)

    def forward(
        self,
        route: str,
        method: bytes,
        target: bytes,
        request: OpenAIRequest,
        client: Client,
        pinned: WorkerRecord | None = None,
        charge: Charge | None = None,
    ) -> None:
        """Send `method target` with the request's body to a worker of its model (to
        `pinned` alone, if given) and relay the answer to `client`; `charge` learns the
        tokens the worker reports and is settled at the end."""
        Exchange(self, route, method, target, request, client, pinned, charge).start()

    def origin(self, url: str) -> Origin:
        origin = self._origins.get(url)
        if origin is None:
            origin = self._origins[url] = Origin.parse(url)
        return origin


@dataclass(frozen=True, slots=True)
class _WorkerAnswer:
    """A worker's whole error answer, kept in case no other worker does better."""

    status: int
    body: bytes
    worker_header: bytes


class Exchange:
    """One client request, sent to one worker at a time, its answer relayed back."""

    __slots__ = (
        "_attempts", "_buffer", "_charge", "_client", "_conn", "_connecting", "_ended_cleanly", "_finished",
        "_key", "_last_activity", "_learn_owner", "_method", "_origin", "_paused", "_pinned", "_proxy",
        "_request", "_retry_timer", "_route", "_started", "_status", "_stream", "_target", "_timeouts",
        "_tried", "_worker", "_worker_headers",
    )  # fmt: skip

    def __init__(
        self,
        proxy: Proxy,
        route: str,
        method: bytes,
        target: bytes,
        request: OpenAIRequest,
        client: Client,
        pinned: WorkerRecord | None = None,
        charge: Charge | None = None,
    ) -> None:
        self._proxy = proxy
        self._route = route
        self._method = method
        self._target = target
        self._request = request
        self._client = client
        self._pinned = pinned
        self._charge = charge
        # A new stored response: note which worker holds it (see response_owners.py).
        self._learn_owner = route == "responses" and method == b"POST"
        self._timeouts = proxy.model_timeouts.get(request.model, proxy.timeouts)
        self._started = monotonic()
        self._tried: set[str] | None = None  # workers that failed this request; made on the first
        self._key: int | None = None  # its prefix key, for a policy that routes by one
        self._attempts = 0
        self._worker: WorkerRecord | None = None
        # x-vpool-worker, then the limits' x-ratelimit-* (on every answer, errors too)
        self._worker_headers: list[tuple[bytes, bytes]] = [(b"x-vpool-worker", b"")]
        if charge is not None and charge.grant is not None:
            self._worker_headers += charge.grant.headers
        self._origin: Origin | None = None
        self._conn: UpstreamConnection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._last_activity = self._started
        self._status = 0
        self._stream = False
        self._paused = False
        self._buffer: list[bytes] = []
        self._ended_cleanly = True
        self._finished = False

    # choosing and sending

    def start(self) -> None:
        self._client.work = self
        self._proxy.active.add(self)
        worker = self._pinned
        if worker is None:
            fleet = self._proxy.fleet
            if fleet.keyed:
                self._key = fleet.routing_key(self._route, self._request)
            try:
                worker = fleet.choose(self._request.model, key=self._key)
            except VpoolError as exc:
                self._fail(exc)
                return
        self._attempts = 1
        self._use(worker)
        self._dispatch()

    def _use(self, worker: WorkerRecord) -> None:
        self._worker = worker
        self._worker_headers[0] = (b"x-vpool-worker", worker.worker_id.encode())
        self._origin = self._proxy.origin(worker.url)
        self._proxy.fleet.took(worker.worker_id)

    def _release_worker(self) -> None:
        if self._worker is not None:
            self._proxy.fleet.inflight[self._worker.worker_id] -= 1
            self._worker = None

    def _dispatch(self) -> None:
        """Send to the chosen worker, on an idle pooled connection or a new one."""
        self._retry_timer = None
        conn = self._proxy.pool.take_idle(self._origin)  # type: ignore[arg-type]
        if conn is not None:
            self._send(conn)
        else:
            self._connecting = asyncio.ensure_future(self._connect_and_send())

    async def _connect_and_send(self) -> None:
        assert self._origin is not None
        try:
            conn = await self._proxy.pool.connect(self._origin, self._timeouts.connect_s)
        except Exception as exc:  # refused, timed out (asyncio.TimeoutError on 3.10), bad address
            self._connecting = None
            if self._finished:
                return
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                kind, why = "connect_timeout", f"no connection within {self._timeouts.connect_s:g} s"
            else:
                kind, why = "connect_error", str(exc)
            self._proxy.metrics.upstream_error(kind)
            model = self._request.model
            self._attempt_failed(kind, UpstreamError(f"No worker for `{model}` could be reached: {why}."))
            return
        self._connecting = None
        if self._finished:
            conn.abort()
            return
        self._send(conn)

    def _send(self, conn: UpstreamConnection) -> None:
        origin = self._origin
        assert origin is not None
        self._conn = conn
        body = self._request.body
        conn.send(
            b"%b %b%b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\n"
            b"accept: application/json\r\ncontent-length: %d\r\n\r\n%b"
            % (self._method, origin.base_path, self._target, origin.host_header, len(body), body),
            self,
        )
        self._last_activity = monotonic()

    def _attempt_failed(self, reason: str, failure: VpoolError | _WorkerAnswer) -> None:
        """This worker failed before any byte reached the client: try another, or give up."""
        proxy = self._proxy
        worker = self._worker
        assert worker is not None
        self._worker_failed()
        self._release_worker()
        tried = self._tried
        if tried is None:
            tried = self._tried = set()
        tried.add(worker.worker_id)
        if self._attempts < proxy.max_attempts and self._pinned is None:
            try:
                following = proxy.fleet.choose(self._request.model, tried, self._key)
            except VpoolError:
                following = None  # no other ready worker: the client gets this failure
            if following is not None:
                proxy.metrics.retried(reason)
                delay = proxy.retry_backoff_s * self._attempts
                self._attempts += 1
                self._status = 0  # a 502/503 head was this attempt's, not the next one's
                self._use(following)
                if delay > 0:
                    self._retry_timer = asyncio.get_running_loop().call_later(delay, self._dispatch)
                else:
                    self._dispatch()
                return
        if isinstance(failure, VpoolError):
            self._fail(failure)
        else:
            body = ensure_openai_error_body(failure.status, failure.body) or failure.body
            headers = [(b"x-vpool-worker", failure.worker_header), *self._worker_headers[1:]]
            self._client.respond(failure.status, body, headers=headers)
            self._finish(failure.status)

    # the worker's answer (UpstreamConnection callbacks)

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        now = monotonic()
        self._last_activity = now
        self._status = status
        if status in _RETRIED_STATUS_KINDS:
            return  # read whole in on_end, then maybe retried: nothing goes out yet
        self._proxy.metrics.first_byte(self._route, self._request.model, now - self._started)
        if status < 400 and headers.get(b"content-type", b"").startswith(EVENT_STREAM):
            self._stream = True  # the head goes out now: never a retry after this
            self._client.start_stream(status, headers[b"content-type"], [SSE_HEADERS, *self._worker_headers])

    def on_body(self, data: bytes) -> None:
        self._last_activity = monotonic()
        if self._stream:
            self._ended_cleanly = data.endswith(b"\n\n")
            if self._learn_owner:
                self._learn_from_stream(data)
            charge = self._charge
            if charge is not None and charge.stream is not None:
                data = charge.stream.feed(data)
            self._client.write_chunk(data)
        else:
            self._buffer.append(data)

    def on_end(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and self._origin is not None:
            self._proxy.pool.release(self._origin, conn)
        status = self._status
        worker = self._worker
        if self._stream:
            if worker is not None:
                self._proxy.ejector.succeeded(worker.worker_id)
            self._write_held()
            self._client.end_stream()
            self._finish(status)
            return
        body = b"".join(self._buffer)
        self._buffer = []
        if status >= 400:
            retried_kind = _RETRIED_STATUS_KINDS.get(status)
            if retried_kind is not None:
                self._proxy.metrics.upstream_error(retried_kind)
                self._attempt_failed(retried_kind, _WorkerAnswer(status, body, self._worker_headers[0][1]))
                return
            body = ensure_openai_error_body(status, body) or body
        elif self._charge is not None:
            self._charge.usage = usage_in(body)
        if worker is not None:
            if status >= 500:
                self._worker_failed()
            else:
                self._proxy.ejector.succeeded(worker.worker_id)
                if self._learn_owner and status == 200:
                    self._proxy.response_owners.learn_from_body(body, worker.worker_id)
        self._client.respond(status, body, headers=self._worker_headers)
        self._finish(status)

    def _learn_from_stream(self, data: bytes) -> None:
        """Find the new response's id in the stream's first event (response.created)."""
        buffered = self._buffer
        buffered.append(data)
        seen = b"".join(buffered)
        end = seen.find(b"\n\n")
        if end < 0 and len(seen) < _MAX_FIRST_EVENT:
            return  # the first event is not whole yet
        if self._worker is not None:
            self._proxy.response_owners.learn_from_events(
                seen[: end if end >= 0 else None], self._worker.worker_id
            )
        self._learn_owner = False
        self._buffer = []

    def on_read_done(self) -> None:
        """What one read from the worker brought has been relayed: send it on."""
        if self._stream:
            self._client.flush()

    def on_lost(self, exc: Exception) -> None:
        conn, self._conn = self._conn, None
        if self._finished:
            return
        if self._status == 0:
            # Nothing came back: the worker cannot have answered, so another may.
            self._proxy.metrics.upstream_error("no_response")
            if conn is not None and conn.used:
                # A keep-alive connection the worker had closed: retry it fresh, same worker.
                self._connecting = asyncio.ensure_future(self._connect_and_send())
                return
            worker_id = self._worker.worker_id if self._worker else "?"
            failure = UpstreamError(
                f"Worker {worker_id} closed the connection without answering ({type(exc).__name__})."
            )
            self._attempt_failed("no_response", failure)
            return
        self._break(f"The worker serving this request failed: {type(exc).__name__}.", "stream_error")

    # the client's side (the Client's Interruptible)

    def cancel(self) -> None:
        """The client left: abort the upstream request at once."""
        if self._finished:
            return
        self._proxy.metrics.client_left()
        self._abort_upstream()
        self._finish(499)

    def pause(self) -> None:
        """The client reads slower than the worker writes: stop reading the worker."""
        self._paused = True
        if self._conn is not None:
            self._conn.pause_reading()

    def resume(self) -> None:
        self._paused = False
        self._last_activity = monotonic()  # the silence was ours, not the worker's
        if self._conn is not None:
            self._conn.resume_reading()

    # endings

    def check_timeout(self, now: float) -> None:
        """Called by the proxy's sweep: has the worker been silent for too long?"""
        if self._finished or self._conn is None or self._paused:
            return  # connecting (the pool's own timeout), waiting to retry, or held by a slow client
        silent = now - self._last_activity
        worker_id = self._worker.worker_id if self._worker else "?"
        if self._status == 0:
            limit = self._timeouts.first_byte_s
            if silent < limit:
                return
            self._proxy.metrics.upstream_error("first_byte_timeout")
            self._abort_upstream()
            failure = UpstreamTimeout(f"Worker {worker_id} did not answer within {limit:g} s.")
            self._attempt_failed("first_byte_timeout", failure)
            return
        if silent < self._timeouts.read_s:
            return
        self._abort_upstream()
        if self._stream:
            self._break("The worker serving this stream stopped sending.", "stream_timeout")
        else:
            self._proxy.metrics.upstream_error("read_timeout")
            self._worker_failed()
            self._fail(UpstreamTimeout(f"Worker {worker_id} stopped sending its answer."))

    def _break(self, message: str, code: str) -> None:
        """The answer broke after it began: end honestly, never a stream that looks complete."""
        self._proxy.metrics.upstream_error(code)
        self._worker_failed()
        if self._stream:
            self._write_held()
            prefix = b"" if self._ended_cleanly else b"\n\n"
            self._client.write_chunk(prefix + error_event(message, code=code))
            self._client.end_stream()
            self._finish(self._status)
        else:
            self._fail(UpstreamError(message))

    def _worker_failed(self) -> None:
        if self._worker is not None and self._proxy.ejector.failed(self._worker.worker_id):
            self._proxy.metrics.ejected()

    def _fail(self, exc: VpoolError) -> None:
        """Answer with an OpenAI error; only ever before any byte reached the client."""
        if self._stream:  # a stream's head is out: all that is left is to close
            self._client.close()
        else:
            headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
            self._client.respond(exc.status_code, exc.json(), headers=headers + self._worker_headers[1:])
        self._finish(exc.status_code)

    def _write_held(self) -> None:
        """What the usage reader holds of an event not yet whole, at the stream's end."""
        if self._charge is not None and self._charge.stream is not None:
            self._client.write_chunk(self._charge.stream.rest())

    def _abort_upstream(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    def _finish(self, status: int) -> None:
        if self._finished:
            return
        self._finished = True
        self._client.work = None  # no reference cycle left for the garbage collector to find
        self._proxy.active.discard(self)
        self._release_worker()
        elapsed = monotonic() - self._started
        # Only a model some worker serves becomes a label: clients cannot grow the series.
        model = self._request.model if self._attempts else "-"
        self._proxy.metrics.answered(self._route, model, status, elapsed)
        if self._charge is not None:
            self._charge.settle(model, status)
