"""A client that leaves frees the engine: the upstream request is cancelled and vLLM aborts it."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.integration.conftest import API_KEY

pytestmark = pytest.mark.integration

# Long enough that the generation would run for many seconds if nobody aborted it.
LONG = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 1000,  # the test fleet serves max_model_len 1024
    "ignore_eos": True,
}


def _unfinished(worker_url: str) -> int:
    return int(httpx.get(f"{worker_url}/vpool/load", timeout=5).json()["unfinished"])


def _worker_url(fleet, worker_id: str) -> str:
    return next(w["url"] for w in fleet.admin_workers() if w["worker_id"] == worker_id)


def _seconds_until_idle(worker_url: str, limit_s: float = 5.0) -> float:
    left_at = time.monotonic()
    while _unfinished(worker_url) > 0:
        assert time.monotonic() - left_at < limit_s, "the engine kept generating for the departed client"
        time.sleep(0.02)
    return time.monotonic() - left_at


def test_stream_client_leaving_aborts_the_generation_within_a_second(fleet, http: httpx.Client) -> None:
    with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
        assert resp.status_code == 200
        worker_url = _worker_url(fleet, resp.headers["x-vpool-worker"])
        events = resp.iter_lines()
        for _ in range(5):
            next(events)
        assert _unfinished(worker_url) == 1  # generating, for us
    # Leaving the block closed the connection mid-stream.
    assert _seconds_until_idle(worker_url) < 1.0


def test_non_stream_client_giving_up_aborts_the_generation_within_a_second(fleet) -> None:
    workers = [w["url"] for w in fleet.admin_workers() if "tiny-chat" in w["models"]]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    outcome: list[BaseException] = []

    def ask_and_give_up() -> None:
        with httpx.Client(base_url=fleet.gateway_url, headers=headers) as client:
            try:
                client.post("/v1/chat/completions", json=LONG, timeout=httpx.Timeout(10, read=1.0))
            except httpx.ReadTimeout as exc:
                outcome.append(exc)

    asker = threading.Thread(target=ask_and_give_up)
    asker.start()
    deadline = time.monotonic() + 2.0
    busy: list[str] = []
    while not busy and time.monotonic() < deadline:
        busy = [url for url in workers if _unfinished(url) > 0]
    assert len(busy) == 1, "no engine picked up the request"
    asker.join(10)
    assert outcome and isinstance(outcome[0], httpx.ReadTimeout)  # the client gave up
    assert _seconds_until_idle(busy[0]) < 1.0
