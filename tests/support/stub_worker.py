"""A stub OpenAI worker, and a way to run any ASGI app on a real socket for a test.

`StubWorker` answers like an OpenAI-compatible server (chat completions and completions, as
JSON or SSE; embeddings; stored responses; `/health`; `/v1/models`; any other POST with a
JSON echo of what it got) with no engine behind it. Its behaviour is
plain attributes a test may change while it runs: an error to answer with, how slowly to
answer or stream, after how many events to drop the connection, whether `/health` passes.
It keeps every request it got, raw body included, so a test can check what the gateway sent.

`serve_in_thread` runs an ASGI app under uvicorn (built by `vpool.serving.make_server`, or by
the `make_server` given, as the real processes are: the gateway passes its own) in a thread
of its own, on 127.0.0.1 and a port the kernel picks. Real sockets matter: httpx's
ASGITransport buffers whole responses, so it cannot show streaming.

`python -m tests.support.stub_worker --port N` serves a stub as a process of its own, for a
test that must kill a server the way a crash would.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.support.processes import free_port
from vpool.serving import make_server

T = TypeVar("T")

EMBEDDING = [0.25, -0.5, 0.125, 1.0]


# ---------------------------------------------------------------------------------------------
# Running an app on a real socket


@dataclass
class RunningServer:
    """An app served in a background thread, with its event loop at hand."""

    url: str
    port: int
    server: uvicorn.Server
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        """Run `coro` on the server's own loop (where its app's state lives) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def request_stop(self) -> None:
        """Ask the server to stop without waiting (stop several at once, then `stop` each)."""
        self.server.should_exit = True

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving and wait for the thread; idempotent. (Generous: on a loaded 2-core
        machine a server's shutdown once took over 10 s.)"""
        self.request_stop()
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise RuntimeError(f"server on {self.url} did not stop within {timeout_s} s")
        if self.errors:
            raise RuntimeError(f"server on {self.url} failed") from self.errors[0]


def closed_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    return free_port()


@contextlib.contextmanager
def serve_in_thread(
    app: Any,
    *,
    graceful_s: float = 1.0,
    start_timeout_s: float = 10.0,
    server_factory: Callable[[Any, str, int], uvicorn.Server] | None = None,
) -> Iterator[RunningServer]:
    """Serve `app` (lifespan included) on 127.0.0.1 until the block ends.

    The socket is bound here and handed to the server, so no other process can take the port
    between choosing and binding it. `server_factory(app, host, port)` builds the server.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    if server_factory is not None:
        server = server_factory(app, "127.0.0.1", port)
    else:
        server = make_server(app, "127.0.0.1", port, graceful_s=graceful_s)
    loop_ready = threading.Event()
    holder: dict[str, asyncio.AbstractEventLoop] = {}
    errors: list[BaseException] = []

    async def serve() -> None:
        holder["loop"] = asyncio.get_running_loop()
        loop_ready.set()
        await server.serve(sockets=[sock])

    def run() -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serve())
        except BaseException as exc:  # reported by stop(), in the test's thread
            errors.append(exc)
        finally:
            loop_ready.set()

    thread = threading.Thread(target=run, name=f"server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(start_timeout_s)
            sock.close()
            raise RuntimeError(f"could not start a server on 127.0.0.1:{port}") from (
                errors[0] if errors else None
            )
        time.sleep(0.005)
    loop_ready.wait()
    running = RunningServer(
        url=f"http://127.0.0.1:{port}",
        port=port,
        server=server,
        loop=holder["loop"],
        thread=thread,
        errors=errors,
    )
    try:
        yield running
    finally:
        try:
            running.stop()
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------
# The stub worker


@dataclass(frozen=True)
class StubError:
    """An error the stub answers every POST with, body bytes as given."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def vllm_detail(cls, status: int, message: str) -> StubError:
        """What vLLM's own server answers for some errors: FastAPI's `{"detail": ...}`."""
        return cls(status, json.dumps({"detail": message}).encode())

    @classmethod
    def openai(
        cls,
        status: int,
        message: str,
        error_type: str = "BadRequestError",
        param: str | None = None,
        code: int | str | None = None,
    ) -> StubError:
        error = {"message": message, "type": error_type, "param": param, "code": code}
        return cls(status, json.dumps({"object": "error", "error": error}).encode())


@dataclass(frozen=True)
class Received:
    """One request as the stub got it off the socket."""

    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    query: str = ""

    def json(self) -> Any:
        return json.loads(self.body)


_BEHAVIOUR = (
    "events",
    "event_interval_s",
    "event_padding",
    "response_delay_s",
    "die_after_events",
    "die_mid_event",
    "error",
    "healthy",
    "hold",
)


class StubWorker:
    """A fake OpenAI-compatible server; change its attributes to change how it answers."""

    def __init__(
        self,
        name: str = "stub",
        *,
        events: int = 3,
        event_interval_s: float = 0.0,
        response_delay_s: float = 0.0,
        die_after_events: int | None = None,
        die_mid_event: bool = False,
        event_padding: int = 0,
        error: StubError | None = None,
        healthy: bool = True,
    ) -> None:
        self.name = name
        self.events = events  # content events per stream, before `[DONE]`
        self.event_interval_s = event_interval_s  # pause between two events of a stream
        self.response_delay_s = response_delay_s  # pause before answering anything
        self.die_after_events = die_after_events  # drop the connection after this many events
        self.die_mid_event = die_mid_event  # ... having sent half of the next one
        self.event_padding = event_padding  # bytes of filler in each event, to make streams large
        self.error = error
        self.healthy = healthy
        # While set and not yet released, every request waits before it is answered.
        self.hold: threading.Event | None = None
        self._defaults = {name: getattr(self, name) for name in _BEHAVIOUR}
        self._received: list[Received] = []
        self._streams_cut = 0
        self.events_sent = 0  # by every stream so far (a test watches a stream held back)
        self.stored: set[str] = set()  # ids of the responses it made, as vLLM's store keeps them
        self._lock = threading.Lock()
        self._server: RunningServer | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/embeddings", self._embeddings, methods=["POST"]),
                Route("/v1/responses", self._create_response, methods=["POST"]),
                Route("/v1/responses/{response_id}", self._stored_response, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/health", self._health, methods=["GET"]),
                Route("/{path:path}", self._echo, methods=["POST"]),
            ]
        )

    # -- running -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[StubWorker]:
        with serve_in_thread(self.app) as server:
            self._server = server
            try:
                yield self
            finally:
                self._server = None

    @property
    def server(self) -> RunningServer:
        if self._server is None:
            raise RuntimeError(f"stub {self.name} is not running")
        return self._server

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        """Stop serving now (the port then refuses connections)."""
        self.server.stop()

    def reset(self) -> None:
        """Back to the behaviour it was built with, having received nothing."""
        for attribute, value in self._defaults.items():
            setattr(self, attribute, value)
        with self._lock:
            self._received.clear()
            self._streams_cut = 0
            self.events_sent = 0
            self.stored.clear()

    # -- what it got ---------------------------------------------------------------------------

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._received)

    @property
    def bodies(self) -> list[bytes]:
        return [r.body for r in self.received]

    @property
    def streams_cut(self) -> int:
        """Streams stopped early because the client (the gateway) went away."""
        with self._lock:
            return self._streams_cut

    # -- what it sends -------------------------------------------------------------------------

    def stream_events(self, model: str, kind: str = "chat") -> list[bytes]:
        """The exact bytes of each SSE event a stream sends, `data: [DONE]` last.

        Written with json.dumps' spaced separators, unlike orjson's compact output, so a test
        can tell the gateway passed them through rather than re-serialized them.
        """
        events = []
        for i in range(self.events):
            if kind == "chat":
                chunk: dict[str, Any] = {
                    "id": f"chatcmpl-{self.name}",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
                }
            else:
                chunk = {
                    "id": f"cmpl-{self.name}",
                    "object": "text_completion",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "text": f"tok{i} ", "finish_reason": None, "logprobs": None}],
                }
            if self.event_padding:
                chunk["pad"] = "x" * self.event_padding
            events.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        return events

    def chat_reply(self, model: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"hello from {self.name}"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }

    # -- endpoints -----------------------------------------------------------------------------

    async def _record(self, request: Request) -> bytes:
        body = await request.body()
        with self._lock:
            self._received.append(
                Received(
                    request.method, request.url.path, body, dict(request.headers.items()), request.url.query
                )
            )
        if self.response_delay_s:
            await asyncio.sleep(self.response_delay_s)
        hold = self.hold
        while hold is not None and not hold.is_set():
            await asyncio.sleep(0.005)
        return body

    def _error_response(self) -> Response | None:
        if self.error is None:
            return None
        return Response(self.error.body, self.error.status, media_type=self.error.content_type)

    def _stream(self, events: list[bytes]) -> Response:
        return _EventStream(events, self)

    def _count_sent(self) -> None:
        with self._lock:
            self.events_sent += 1

    def _count_cut(self) -> None:
        with self._lock:
            self._streams_cut += 1

    async def _chat(self, request: Request) -> Response:
        body = json.loads(await self._record(request))
        if (error := self._error_response()) is not None:
            return error
        if body.get("stream"):
            return self._stream(self.stream_events(body["model"], "chat"))
        return JSONResponse(self.chat_reply(body["model"]))

    async def _completions(self, request: Request) -> Response:
        body = json.loads(await self._record(request))
        if (error := self._error_response()) is not None:
            return error
        if body.get("stream"):
            return self._stream(self.stream_events(body["model"], "completions"))
        reply = {
            "id": f"cmpl-{self.name}",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {"index": 0, "text": f"hello from {self.name}", "finish_reason": "stop", "logprobs": None}
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
        }
        return JSONResponse(reply)

    async def _embeddings(self, request: Request) -> Response:
        body = json.loads(await self._record(request))
        if (error := self._error_response()) is not None:
            return error
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1
        vector: Any = EMBEDDING
        if body.get("encoding_format") == "base64":  # the openai SDK asks for this by default
            vector = base64.b64encode(struct.pack(f"<{len(EMBEDDING)}f", *EMBEDDING)).decode()
        reply = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)],
            "model": body["model"],
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }
        return JSONResponse(reply)

    async def _create_response(self, request: Request) -> Response:
        """A Responses API answer, stored (as vLLM does with its store enabled)."""
        body = json.loads(await self._record(request))
        if (error := self._error_response()) is not None:
            return error
        with self._lock:
            response_id = f"resp_{self.name}_{len(self.stored)}"
            self.stored.add(response_id)
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return JSONResponse(_not_found(previous), status_code=404)
        reply = {"id": response_id, "object": "response", "status": "completed", "model": body["model"],
                 "previous_response_id": previous, "output": [], "served_by": self.name}  # fmt: skip
        if body.get("stream"):
            created = {"type": "response.created", "response": {**reply, "status": "in_progress"}}
            done = {"type": "response.completed", "response": reply}
            events = [
                b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
                for e in (created, done)
            ]
            return self._stream(events)
        return JSONResponse(reply)

    async def _stored_response(self, request: Request) -> Response:
        await self._record(request)
        response_id = request.path_params["response_id"]
        if response_id not in self.stored:
            return JSONResponse(_not_found(response_id), status_code=404)
        return JSONResponse(
            {"id": response_id, "object": "response", "status": "completed", "served_by": self.name}
        )

    async def _echo(self, request: Request) -> Response:
        """Any other route a worker may serve (tokenize, score, rerank, ...): what it got."""
        raw = await self._record(request)
        if (error := self._error_response()) is not None:
            return error
        try:
            got: Any = json.loads(raw) if raw else None
        except ValueError:
            got = None
        return JSONResponse({"object": "echo", "path": request.url.path, "body": got, "served_by": self.name})

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200 if self.healthy else 503)


class _EventStream(Response):
    """SSE written event by event, as the stub's settings say (read once, at the start).

    With `die_after_events` it stops and leaves the body unfinished (with `die_mid_event`,
    after half of the next event): an ASGI app that returns before the body's last message
    makes uvicorn close the connection without the closing chunk, as a crashed worker would.
    A stream whose client leaves stops at once and counts as cut, as vLLM aborts a request
    whose client is gone.
    """

    def __init__(self, events: list[bytes], stub: StubWorker) -> None:
        super().__init__(media_type="text/event-stream")
        self._events = events
        self._interval_s = stub.event_interval_s
        self._die_after = stub.die_after_events
        self._die_mid_event = stub.die_mid_event
        self._on_cut = stub._count_cut
        self._on_sent = stub._count_sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()

        async def listen() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.create_task(listen())
        try:
            headers = [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            for i, event in enumerate(self._events):
                if self._die_after is not None and i >= self._die_after:
                    if self._die_mid_event:
                        half = event[: len(event) // 2]
                        await send({"type": "http.response.body", "body": half, "more_body": True})
                    return
                if i and self._interval_s:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(gone.wait(), self._interval_s)
                if gone.is_set():
                    self._on_cut()
                    return
                await send({"type": "http.response.body", "body": event, "more_body": True})
                self._on_sent()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def _not_found(response_id: str) -> dict[str, Any]:
    message = f"Response with id '{response_id}' not found."
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": "response_id", "code": 404}
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m tests.support.stub_worker --port N`: a stub worker as a process of its own,
    for tests that need a server to kill (the console's browser test registers one with the
    controller as an external server)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="stub")
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--event-interval-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    stub = StubWorker(args.name, events=args.events, event_interval_s=args.event_interval_s)
    make_server(stub.app, "127.0.0.1", args.port, graceful_s=1.0).run()


if __name__ == "__main__":
    main()
