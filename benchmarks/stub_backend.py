"""A fast stub OpenAI backend, so that benchmarks measure the gateway and not the backend.

One asyncio protocol on uvloop with httptools' parser and answers built once at start:
tens of thousands of requests per second on one core. It serves `/v1/chat/completions`,
`/v1/completions` (JSON, or SSE with `--events` events), `/v1/embeddings`, `/v1/models`
and `/health`.

With `--slots N --token-delay-ms D` it becomes a simple queueing model of an engine, for
routing studies: N requests run at once, the rest wait; each generates `max_tokens` tokens
(default `--events`) at D ms per token, and streams them as it goes.

With `--event-delay-ms D` (and no `--slots`) every stream sends its `--events` events D ms
apart, all streams at once: a stream stays open `events x D` ms, which is how a benchmark
holds ten thousand streams open through a gateway. Non-streaming answers stay immediate.

    python benchmarks/stub_backend.py --port 9001 --events 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httptools
import orjson
import uvloop

CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
EMBEDDINGS = b"/v1/embeddings"
MODELS = b"/v1/models"
HEALTH = b"/health"


def _http(status: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class Answers:
    """Every response body, built once."""

    def __init__(self, model: str, events: int, dim: int) -> None:
        self.model = model
        self.events = events
        now = int(time.time())
        usage = {"prompt_tokens": 8, "completion_tokens": events, "total_tokens": 8 + events}
        chat = {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": now,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi " * events},
                    "finish_reason": "length",
                    "logprobs": None,
                }
            ],
            "usage": usage,
        }
        completion = {
            "id": "cmpl-stub",
            "object": "text_completion",
            "created": now,
            "model": model,
            "choices": [{"index": 0, "text": "hi " * events, "finish_reason": "length", "logprobs": None}],
            "usage": usage,
        }
        vector = [round(1 / dim**0.5, 6)] * dim
        embedding = {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "usage": {"prompt_tokens": 8, "total_tokens": 8},
        }
        models = {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": now, "owned_by": "stub"}],
        }
        self.json = {
            CHAT: _http(b"200 OK", b"application/json", orjson.dumps(chat)),
            COMPLETIONS: _http(b"200 OK", b"application/json", orjson.dumps(completion)),
            EMBEDDINGS: _http(b"200 OK", b"application/json", orjson.dumps(embedding)),
            MODELS: _http(b"200 OK", b"application/json", orjson.dumps(models)),
            HEALTH: _http(b"200 OK", b"application/json", b'{"status":"ok"}'),
        }
        self.not_found = _http(
            b"404 Not Found",
            b"application/json",
            b'{"error":{"message":"no such route","type":"not_found_error","param":null,"code":null}}',
        )
        self.bad_request = _http(
            b"400 Bad Request",
            b"application/json",
            b'{"error":{"message":"body is not JSON","type":"invalid_request_error",'
            b'"param":null,"code":null}}',
        )
        self.chat_events = self._events(
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "created": now,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": "hi "}, "finish_reason": None}],
            }
        )
        self.completion_events = self._events(
            {
                "id": "cmpl-stub",
                "object": "text_completion",
                "created": now,
                "model": model,
                "choices": [{"index": 0, "text": "hi ", "finish_reason": None}],
            }
        )
        self.usage_event = _sse(
            {
                "id": "stub",
                "object": "chat.completion.chunk",
                "created": now,
                "model": model,
                "choices": [],
                "usage": usage,
            }
        )
        self.done = b"data: [DONE]\n\n"
        self.whole_stream = {
            CHAT: SSE_HEAD + _chunk(b"".join(self.chat_events) + self.done) + b"0\r\n\r\n",
            COMPLETIONS: SSE_HEAD + _chunk(b"".join(self.completion_events) + self.done) + b"0\r\n\r\n",
        }

    def _events(self, chunk: dict) -> list[bytes]:
        return [_sse(chunk) for _ in range(self.events)]


class StubProtocol(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection; answers each request as it completes."""

    def __init__(
        self,
        answers: Answers,
        slots: asyncio.Semaphore | None,
        token_delay: float,
        event_delay: float = 0.0,
    ) -> None:
        self._answers = answers
        self._slots = slots
        self._token_delay = token_delay
        self._event_delay = event_delay
        self._tasks: set[asyncio.Future[None]] = set()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url, body = self._url.split(b"?", 1)[0], b"".join(self._body)
        self._url, self._body = b"", []
        keep_alive = self._parser.should_keep_alive()
        self._answer(url, body, keep_alive)

    def _answer(self, url: bytes, body: bytes, keep_alive: bool) -> None:
        transport = self._transport
        assert transport is not None
        answers = self._answers
        if url in (CHAT, COMPLETIONS):
            try:
                request = orjson.loads(body)
            except orjson.JSONDecodeError:
                transport.write(answers.bad_request)
                return
            stream = request.get("stream") is True
            if self._slots is not None:
                tokens = int(request.get("max_tokens") or answers.events)
                self._spawn(self._generate(url, stream, tokens, keep_alive))
                return
            if stream and self._event_delay:
                self._spawn(self._stream_slowly(url, keep_alive))
                return
            transport.write(answers.whole_stream[url] if stream else answers.json[url])
        else:
            transport.write(answers.json.get(url, answers.not_found))
        if not keep_alive:
            transport.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _stream_slowly(self, url: bytes, keep_alive: bool) -> None:
        """`--event-delay-ms`: one event per delay; sleeping, so other streams go on meanwhile."""
        transport = self._transport
        assert transport is not None
        answers = self._answers
        transport.write(SSE_HEAD)
        for event in answers.chat_events if url == CHAT else answers.completion_events:
            await asyncio.sleep(self._event_delay)
            if transport.is_closing():
                return
            transport.write(_chunk(event))
        transport.write(_chunk(answers.done) + b"0\r\n\r\n")
        if not keep_alive:
            transport.close()

    async def _generate(self, url: bytes, stream: bool, tokens: int, keep_alive: bool) -> None:
        """The queueing model: wait for a slot, then one token per `token_delay`."""
        transport = self._transport
        assert transport is not None and self._slots is not None
        answers = self._answers
        events = answers.chat_events if url == CHAT else answers.completion_events
        async with self._slots:
            if stream:
                transport.write(SSE_HEAD)
            for i in range(tokens):
                await asyncio.sleep(self._token_delay)
                if transport.is_closing():
                    return
                if stream:
                    transport.write(_chunk(events[i % len(events)]))
        if stream:
            transport.write(_chunk(answers.usage_event + answers.done) + b"0\r\n\r\n")
        else:
            transport.write(answers.json[url])
        if not keep_alive:
            transport.close()


async def serve(
    host: str,
    port: int,
    answers: Answers,
    slots: int,
    token_delay_ms: float,
    ready: Callable[[], None] | None = None,
    event_delay_ms: float = 0.0,
) -> None:
    semaphore = asyncio.Semaphore(slots) if slots > 0 else None
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: StubProtocol(answers, semaphore, token_delay_ms / 1000, event_delay_ms / 1000),
        host,
        port,
        reuse_address=True,
        backlog=4096,
    )
    if ready:
        ready()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--model", default="stub", help="model name in answers (any name is accepted)")
    parser.add_argument("--events", type=int, default=16, help="content events per SSE stream")
    parser.add_argument("--dim", type=int, default=384, help="embedding size")
    parser.add_argument("--slots", type=int, default=0, help="concurrent requests (0: no queueing model)")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="per-token delay with --slots")
    parser.add_argument(
        "--event-delay-ms",
        type=float,
        default=0.0,
        help="space stream events this far apart (without --slots)",
    )
    args = parser.parse_args()
    answers = Answers(args.model, args.events, args.dim)
    print(f"stub backend on http://{args.host}:{args.port} (pid {os.getpid()})", flush=True)
    uvloop.run(
        serve(
            args.host, args.port, answers, args.slots, args.token_delay_ms, event_delay_ms=args.event_delay_ms
        )
    )


if __name__ == "__main__":
    main()
