"""A client that leaves frees the engine: the upstream request is cancelled and vLLM aborts it."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

# Long enough that the generation would run for seconds if nobody aborted it. The test
# fleet serves max_model_len 1024, so the steps are few: eight sequences with top-20
# logprobs make each step dearer, else a fast machine finishes them all within a second.
LONG = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 1000,
    "n": 8,
    "logprobs": True,
    "top_logprobs": 20,
    "ignore_eos": True,
}
ASKED_TOKENS = LONG["max_tokens"] * LONG["n"]
# The engine must go idle this soon after the client left (0.13 s median, 0.3 s at most
# over 16 departures here); the generation itself would take several seconds more.
IDLE_WITHIN_S = 1.0


def _unfinished(worker_url: str) -> int:
    return int(httpx.get(f"{worker_url}/vpool/load", timeout=5).json()["unfinished"])


def _generated(worker_url: str) -> float:
    """The engine's count of tokens generated so far: a counter, so no poll can miss a burst."""
    text = httpx.get(f"{worker_url}/metrics", timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "vllm:generation_tokens"
        for sample in family.samples
        if sample.name == "vllm:generation_tokens_total"
    )


def _tiny_chat_workers(fleet) -> dict[str, str]:
    """worker id -> URL, read before the request so nothing slows us down mid-stream."""
    return {w["worker_id"]: w["url"] for w in fleet.admin_workers() if "tiny-chat" in w["models"]}


def _everyone(fleet) -> dict[str, object]:
    """Every engine's load, for a failure message: a worker that has gone says so."""

    def load(url: str) -> object:
        try:
            return _unfinished(url)
        except httpx.HTTPError as exc:
            return f"unreachable: {exc}"

    return {
        w["worker_id"]: (w["url"], w["models"], load(w["url"]))
        for w in fleet.admin_workers()
        if w["runner"] == "generate"
    }


def _wait_until_generating(before: dict[str, float], limit_s: float = 30.0) -> str:
    """The worker whose engine started on our request (the one test request in flight)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        busy = [url for url, count in before.items() if _generated(url) > count]
        if busy:
            assert len(busy) == 1, f"one request, yet {busy} are all generating"
            return busy[0]
        time.sleep(0.02)
    raise AssertionError(f"no engine started on the request within {limit_s} s")


def _assert_aborted(worker_url: str, before: float) -> None:
    """The engine stopped early: it generated fewer tokens than the request asked for."""
    generated = _generated(worker_url) - before
    assert 0 < generated < ASKED_TOKENS, (
        f"the engine generated {generated:.0f} of {ASKED_TOKENS} tokens: it was not aborted"
    )


def _seconds_until_idle(worker_url: str, limit_s: float = 10.0) -> float:
    left_at = time.monotonic()
    while _unfinished(worker_url) > 0:
        assert time.monotonic() - left_at < limit_s, "the engine kept generating for the departed client"
        time.sleep(0.02)
    return time.monotonic() - left_at


def test_stream_client_leaving_aborts_the_generation(fleet, http: httpx.Client) -> None:
    workers = _tiny_chat_workers(fleet)
    before = {url: _generated(url) for url in workers.values()}
    seen: list[str] = []
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
        assert resp.status_code == 200
        worker_url = workers[resp.headers["x-vpool-worker"]]
        lines = resp.iter_lines()  # held: a dropped iterator would close the connection
        for line in lines:
            seen.append(line)
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # text is flowing
        # vLLM runs each of the n sequences as a request of its own.
        assert _unfinished(worker_url) == LONG["n"], (
            f"{resp.headers['x-vpool-worker']} should be generating for us; all: {_everyone(fleet)}"
            f" {workers}; tokens generated since we asked: "
            f"{ {url: _generated(url) - count for url, count in before.items()} }; the stream so far: {seen}"
        )
    # Leaving the block closed the connection mid-stream.
    assert _seconds_until_idle(worker_url) < IDLE_WITHIN_S
    _assert_aborted(worker_url, before[worker_url])


def test_non_stream_client_giving_up_aborts_the_generation(fleet) -> None:
    workers = _tiny_chat_workers(fleet)
    before = {url: _generated(url) for url in workers.values()}
    gateway = urlsplit(fleet.gateway_url)
    body = json.dumps(LONG).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {gateway.netloc}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection((gateway.hostname, gateway.port), timeout=10) as client:
        client.sendall(request)
        busy = _wait_until_generating(before)
        # Generating for this request, not finishing some other one: n sequences are running.
        assert _unfinished(busy) == LONG["n"], f"all: {_everyone(fleet)}"
        # The client gives up (a timeout, a closed tab): it closes the connection unanswered.
    assert _seconds_until_idle(busy) < IDLE_WITHIN_S
    _assert_aborted(busy, before[busy])
