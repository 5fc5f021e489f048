"""Losing workers: an engine that dies, a worker killed outright, one drained by SIGTERM.

Runs in file order on the three `tiny-chat-ha` replicas: ha-e loses its engine, ha-c is
killed, and the drain test then takes down the last one, ha-d."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.support.processes import child_pids

pytestmark = pytest.mark.integration

HA = {"model": "tiny-chat-ha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
EXPIRY_WINDOW_S = 3.0 + 1.0  # three heartbeats, plus a gateway refresh and margin


def _ready_ids(fleet) -> set[str]:
    return {w["worker_id"] for w in fleet.admin_workers() if w["state"] == "READY"}


def _worker_url(fleet, worker_id: str) -> str:
    return next(w["url"] for w in fleet.admin_workers() if w["worker_id"] == worker_id)


def test_worker_whose_engine_dies_answers_503_and_leaves_the_pool(fleet, http: httpx.Client) -> None:
    assert {"ha-c", "ha-d", "ha-e"} <= _ready_ids(fleet)
    worker = fleet.workers["ha-e"]
    url = _worker_url(fleet, "ha-e")
    [engine_core] = child_pids(worker.popen.pid, "EngineCor")
    in_flight: list[httpx.Response] = []
    long_request = {**HA, "max_tokens": 900, "ignore_eos": True}
    chat_url = f"{url}/v1/chat/completions"
    asker = threading.Thread(
        target=lambda: in_flight.append(httpx.post(chat_url, json=long_request, timeout=60))
    )
    asker.start()
    time.sleep(0.5)  # the long request is generating

    os.kill(engine_core, signal.SIGKILL)  # as the OOM killer would
    killed_at = time.monotonic()
    asker.join(60)
    # What a gateway sees, in flight and after: a retryable 503, not vLLM's bare 500.
    [answer] = in_flight
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "engine_unavailable"

    failures = []
    while worker.popen.poll() is None and time.monotonic() - killed_at < 30:
        resp = http.post("/v1/chat/completions", json=HA)
        if resp.status_code != 200:
            failures.append((resp.status_code, resp.text))
        time.sleep(0.1)
    assert failures == []  # the gateway retried elsewhere: clients saw nothing

    assert worker.popen.wait(timeout=30) == 1  # a launcher restarts a worker that exits 1
    assert "ha-e" not in _ready_ids(fleet)
    assert "engine of ha-e died" in worker.log_tail()


def test_killed_worker_leaves_routing_while_the_other_replica_serves(fleet, http: httpx.Client) -> None:
    assert {"ha-c", "ha-d"} <= _ready_ids(fleet)
    fleet.workers["ha-c"].popen.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    failures = []
    while time.monotonic() - killed_at < EXPIRY_WINDOW_S + 2:
        resp = http.post("/v1/chat/completions", json=HA)
        if resp.status_code != 200:
            failures.append(resp.status_code)
        else:
            assert resp.headers["x-vpool-worker"] == "ha-d"
        time.sleep(0.1)
    assert failures == []  # a refused connection is retried on the live replica

    assert "ha-c" not in _ready_ids(fleet)
    health = http.get("/health").json()
    assert health["models"]["tiny-chat-ha"] == 1


def test_sigterm_drains_without_cutting_a_stream(fleet, http: httpx.Client) -> None:
    worker = fleet.workers["ha-d"]
    body = {**HA, "max_tokens": 900, "ignore_eos": True, "stream": True}
    events: list[str] = []

    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.headers["x-vpool-worker"] == "ha-d"
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        events.append(first)
        sent_at = time.monotonic()
        threading.Thread(target=worker.popen.send_signal, args=(signal.SIGTERM,)).start()
        events.extend(line for line in lines if line)

    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length"  # the stream ran to its end, not cut
    assert all(e.startswith("data: {") for e in events[:-1])
    assert not any("error" in chunk for chunk in chunks)  # no error event from the gateway

    worker.popen.wait(timeout=60)
    assert worker.popen.returncode == 0
    assert time.monotonic() - sent_at < 60
    states = {w["worker_id"]: w["state"] for w in fleet.admin_workers()}
    assert states.get("ha-d") in (None, "GONE")

    time.sleep(0.5)
    ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert "tiny-chat-ha" not in ids
    gone = http.post("/v1/chat/completions", json=HA)
    assert gone.status_code == 503
    assert gone.headers["retry-after"]
    assert gone.json()["error"]["code"] == "no_worker_available"
