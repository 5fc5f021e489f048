"""The benchmarks' stub backend answers like an OpenAI server, over a real socket.

Every gateway comparison stands on this stub: if it answered the wrong shape, each system
would be measured on a request it mishandles.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.processes import free_port

STUB = Path(__file__).resolve().parents[2] / "benchmarks" / "stub_backend.py"
EVENTS = 5
CHAT_BODY = {"model": "stub", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def start_stub() -> Iterator[Callable[..., str]]:
    """Start stubs with given flags; every one is stopped at the end of the module."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(*flags: str) -> str:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(STUB), "--port", str(port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, "the stub backend exited at start"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the stub backend did not listen within 20 s")

    yield start
    for process in processes:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def stub(start_stub: Callable[..., str]) -> str:
    return start_stub("--events", str(EVENTS))


def _data_lines(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


def test_chat_answers_one_json_completion(stub: str) -> None:
    response = httpx.post(stub + "/v1/chat/completions", json=CHAT_BODY)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "hi " * EVENTS


def test_chat_stream_sends_each_event_then_done(stub: str) -> None:
    response = httpx.post(stub + "/v1/chat/completions", json={**CHAT_BODY, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.text.endswith("data: [DONE]\n\n")
    *events, done = _data_lines(response.text)
    assert done == "[DONE]"
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events] == ["hi "] * EVENTS


def test_embeddings_are_384_floats(stub: str) -> None:
    response = httpx.post(stub + "/v1/embeddings", json={"model": "stub", "input": "a cat"})
    assert response.status_code == 200
    vector = response.json()["data"][0]["embedding"]
    assert len(vector) == 384
    assert all(isinstance(x, float) for x in vector)


def test_unknown_path_is_404_in_openai_shape(stub: str) -> None:
    response = httpx.post(stub + "/v1/nothing-here", json={})
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_event_delay_spaces_events_without_blocking_other_streams(
    start_stub: Callable[..., str],
) -> None:
    delay_s, events, streams = 0.1, 3, 5
    url = start_stub("--events", str(events), "--event-delay-ms", str(delay_s * 1000))

    async def one(client: httpx.AsyncClient) -> list[float]:
        arrivals: list[float] = []
        body = {**CHAT_BODY, "stream": True}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
        return arrivals

    started = time.monotonic()
    async with httpx.AsyncClient() as client:
        results = await asyncio.gather(*(one(client) for _ in range(streams)))
    elapsed = time.monotonic() - started

    for arrivals in results:
        assert len(arrivals) == events + 1  # and `data: [DONE]`
        gaps = [b - a for a, b in itertools.pairwise(arrivals[:events])]
        assert all(gap >= delay_s * 0.9 for gap in gaps)
    # One after another they would take streams x events x delay = 1.5 s.
    assert elapsed < streams * events * delay_s / 2
