"""The controller's view of real workers, and routing across replicas."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from tests.integration.conftest import API_KEY

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
    assert set(a["load"]) == {
        "running", "waiting", "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits"
    }  # fmt: skip
    assert workers["embed-f"]["runner"] == "pooling"
    # What each engine runs at once, as vLLM settled it: the fair share's capacity.
    assert workers["tiny-b"]["max_num_seqs"] == 32
    assert isinstance(a["max_num_seqs"], int) and a["max_num_seqs"] > 32  # vLLM's default


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


def _sample(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return 0.0


def test_the_gateway_shows_a_worker_finding_a_repeated_prompt_in_its_prefix_cache(fleet) -> None:
    """The hit counters come from the engine itself: the gateway's copy (through heartbeats and
    the registry) ends equal to the worker's own `vllm:prefix_cache_hits_total`."""
    worker = next(w for w in fleet.admin_workers() if w["worker_id"] == "tiny-a")
    labels = {"worker": "tiny-a", "model": "tiny-chat"}
    hits = "vpool_worker_prefix_cache_hit_tokens_total"
    before = _sample(httpx.get(f"{fleet.gateway_url}/metrics").text, hits, **labels)
    # 700 prompt tokens (several KV blocks) straight to one engine, twice: the second finds the
    # first's blocks in its cache. Token ids, so the count does not depend on the tokenizer.
    body = {"model": "tiny-chat", "prompt": list(range(20, 720)), "max_tokens": 1}
    for _ in range(2):
        assert httpx.post(f"{worker['url']}/v1/completions", json=body, timeout=120).status_code == 200
    deadline = time.monotonic() + 15  # a heartbeat (1 s), then a gateway refresh (0.2 s)
    while True:
        engine = _sample(httpx.get(f"{worker['url']}/metrics").text, "vllm:prefix_cache_hits_total")
        shown = _sample(httpx.get(f"{fleet.gateway_url}/metrics").text, hits, **labels)
        if shown == engine and shown > before:
            break
        assert time.monotonic() < deadline, f"gateway shows {shown} hit tokens, the engine {engine}"
        time.sleep(0.2)
    assert shown - before >= 512  # most of the repeated prompt, in whole blocks
    console = httpx.get(f"{fleet.gateway_url}/ui/api/fleet", headers={"Authorization": f"Bearer {API_KEY}"})
    [row] = [w for w in console.json()["workers"] if w["worker_id"] == "tiny-a"]
    assert 0 < row["prefix_cache_hit_rate"] <= 1 and row["prefix_cache_hits"] >= shown
