"""The controller's view of real workers, and routing across replicas."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

pytestmark = pytest.mark.integration

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_admin_view_lists_workers_with_model_url_tp_state_heartbeat_and_load(fleet) -> None:
    workers = {w["worker_id"]: w for w in fleet.admin_workers()}
    a = workers["tiny-a"]
    assert a["models"] == ["tiny-chat"]
    assert a["url"].startswith("http://127.0.0.1:")
    assert a["tensor_parallel_size"] == 1
    assert a["state"] == "READY"
    assert time.time() - a["last_heartbeat"] < 5
    assert set(a["load"]) == {"running", "waiting", "kv_cache_usage"}
    assert workers["embed-f"]["runner"] == "pooling"


def test_admin_view_needs_the_registration_token(fleet) -> None:
    resp = httpx.get(f"{fleet.controller_url}/v1/workers")
    assert resp.status_code == 401
    assert "error" in resp.json()


def test_both_replicas_receive_traffic(http: httpx.Client) -> None:
    served = Counter(
        http.post("/v1/chat/completions", json=CHAT).headers["x-vpool-worker"] for _ in range(12)
    )
    assert set(served) == {"tiny-a", "tiny-b"}


def test_concurrent_requests_spread_over_replicas(http: httpx.Client) -> None:
    body = {**CHAT, "max_tokens": 24, "ignore_eos": True}
    served: list[str] = []

    def call() -> None:
        served.append(http.post("/v1/chat/completions", json=body).headers["x-vpool-worker"])

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(served)
    assert len(served) == 8
    assert min(counts["tiny-a"], counts["tiny-b"]) >= 2  # least-outstanding balances


def test_heartbeats_report_the_engine_running_a_request(fleet, http: httpx.Client) -> None:
    body = {**CHAT, "max_tokens": 900, "ignore_eos": True}
    served: list[str] = []
    call = threading.Thread(
        target=lambda: served.append(http.post("/v1/chat/completions", json=body).headers["x-vpool-worker"])
    )
    call.start()
    running_seen: dict[str, int] = {}
    while call.is_alive():
        for w in fleet.admin_workers():
            running_seen[w["worker_id"]] = max(running_seen.get(w["worker_id"], 0), w["load"]["running"])
        time.sleep(0.1)
    call.join()
    assert running_seen[served[0]] >= 1
