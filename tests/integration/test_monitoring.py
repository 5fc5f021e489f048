"""Monitoring on the real fleet: no dashboard panel is empty by a typo, and Prometheus finds
every gateway and worker through the controller alone.

After a few requests through a gateway (so histograms and counters have samples), the
gateways', the workers' (real vLLM) and the controller's `/metrics` are scraped, and every
metric each panel of deploy/grafana/vpool.json queries must be among them. Then a real
Prometheus (Debian's `prometheus`), given only the controller's `/v1/targets` as in
deploy/prometheus/prometheus.yml, must scrape every gateway and worker, and the panels'
queries must return series from it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import API_KEY, TOKEN, Fleet
from tests.support.dashboard import (
    exposed_names,
    load_dashboard,
    metric_names,
    prometheus_config_with_token,
    queries,
)
from tests.support.processes import Proc, free_port

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Series the requests below must have produced (declared is not enough for these).
MUST_HAVE_SAMPLES = {
    "vpool_requests_total",
    "vpool_time_to_first_byte_seconds_bucket",
    "vpool_request_duration_seconds_bucket",
    "vpool_tokens_total",
    "vpool_ready_workers",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_waiting",
}


@pytest.fixture(scope="module")
def traffic(fleet: Fleet) -> None:
    """A few answers through each gateway: plain, streamed, and an embedding."""
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for url in fleet.gateway_urls:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as http:
            assert http.post("/v1/chat/completions", json=chat).status_code == 200
            streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
            with http.stream("POST", "/v1/chat/completions", json=streamed) as resp:
                assert resp.status_code == 200
                resp.read()
            assert http.post("/v1/embeddings", json={"model": "minilm", "input": "hello"}).status_code == 200


def live_workers(fleet: Fleet) -> list[dict[str, Any]]:
    return [w for w in fleet.admin_workers() if w["state"] != "GONE"]


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.text


def sampled_names(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_metric_a_panel_queries_is_exported_by_a_real_gateway_worker_or_controller(
    fleet: Fleet, traffic: None
) -> None:
    texts = [scrape(url) for url in fleet.gateway_urls]
    texts += [scrape(w["url"]) for w in live_workers(fleet)]
    texts.append(scrape(fleet.controller_url, AUTH))
    exposed = set().union(*map(exposed_names, texts))
    sampled = set().union(*map(sampled_names, texts))
    missing = [
        f"{title}: {name}"
        for title, expr in queries(load_dashboard())
        for name in sorted(metric_names(expr))
        if name not in exposed
    ]
    assert not missing, "panels query metrics nobody exports:\n" + "\n".join(missing)
    assert MUST_HAVE_SAMPLES <= sampled, MUST_HAVE_SAMPLES - sampled


def test_targets_list_the_fleets_gateways_and_workers(fleet: Fleet) -> None:
    resp = httpx.get(f"{fleet.controller_url}/v1/targets", headers=AUTH, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    groups = resp.json()
    gateways = {g["targets"][0] for g in groups if g["labels"]["vpool_role"] == "gateway"}
    assert {url.removeprefix("http://") for url in fleet.gateway_urls} <= gateways
    workers = {g["labels"]["vpool_worker_id"]: g for g in groups if g["labels"]["vpool_role"] == "worker"}
    expected = {w["worker_id"]: w for w in live_workers(fleet)}
    assert set(workers) == set(expected)
    assert {"tiny-a", "tiny-b", "embed-f"} <= set(workers)
    for worker_id, group in workers.items():
        assert group["targets"] == [expected[worker_id]["url"].removeprefix("http://")]
        assert group["labels"]["vpool_model"] == expected[worker_id]["models"][0]
    assert workers["embed-f"]["labels"]["vpool_runner"] == "pooling"
    assert httpx.get(f"{fleet.controller_url}/v1/targets", timeout=10).status_code == 401


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus whose only lead to the fleet is the controller, as in deploy/."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `apt-get install prometheus` (scripts/test.sh does)")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "token").write_text(TOKEN)
    shipped = yaml.safe_load(prometheus_config_with_token(work / "token"))
    jobs = {job["job_name"]: job for job in shipped["scrape_configs"]}
    # The shipped config (with its token), pointed at this fleet's controller, scraping fast.
    discovery = jobs["vpool"]["http_sd_configs"][0]
    discovery |= {"url": f"{fleet.controller_url}/v1/targets", "refresh_interval": "2s"}
    jobs["vpool-controller"]["static_configs"] = [{"targets": [fleet.controller_url.removeprefix("http://")]}]
    # Two cores shared with seven engines: a scrape may take more than a second.
    fast = {"scrape_interval": "2s", "scrape_timeout": "2s", "evaluation_interval": "2s"}
    config = {"global": fast, "scrape_configs": list(jobs.values())}
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = work / "prometheus.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [
                binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    proc = Proc("prometheus", popen, log_path)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop(timeout=10)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for(check: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.5)


def test_prometheus_scrapes_every_gateway_and_worker_found_through_the_controller_and_panels_get_data(
    fleet: Fleet, traffic: None, prometheus: str
) -> None:
    wanted = {url.removeprefix("http://") for url in fleet.gateway_urls}
    wanted |= {w["url"].removeprefix("http://") for w in live_workers(fleet)}

    def all_up() -> bool:
        try:
            up = query(prometheus, "up == 1")
        except (httpx.HTTPError, ValueError):
            return False
        return wanted <= {s["metric"]["instance"] for s in up}

    # Discovery sends updates every 5 s and the first scrape waits for a slot: about 20 s.
    try:
        wait_for(all_up, "every gateway and worker up in Prometheus", timeout_s=120)
    except AssertionError:
        active = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        seen = {t["labels"]["instance"]: (t["health"], t["lastError"]) for t in active}
        raise AssertionError(f"wanted {sorted(wanted)}, Prometheus has {seen}") from None
    jobs = {s["metric"]["instance"]: s["metric"]["job"] for s in query(prometheus, "up")}
    assert {jobs[url.removeprefix("http://")] for url in fleet.gateway_urls} == {"vpool-gateway"}
    assert jobs[fleet.controller_url.removeprefix("http://")] == "vpool-controller"
    # Traffic during the scrapes, so rates and quantiles have two points to work from.
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(3):
        httpx.post(f"{fleet.gateway_url}/v1/chat/completions", json=chat, headers=headers, timeout=120)
        time.sleep(2.5)
    for expr in (
        "sum by (vpool_model) (rate(vllm:generation_tokens_total[1m]))",
        "histogram_quantile(0.95, sum by (le, model) (rate(vpool_time_to_first_byte_seconds_bucket[1m])))",
        "sum by (key, kind) (rate(vpool_tokens_total[1m]))",
        "max by (vpool_worker_id) (vllm:kv_cache_usage_perc)",
        "max by (model) (vpool_ready_workers)",
        "max by (worker, model) (rate(vpool_worker_prefix_cache_hit_tokens_total[1m]))"
        " / max by (worker, model) (rate(vpool_worker_prefix_cache_query_tokens_total[1m]))",
    ):
        assert expr in [e for _, e in queries(load_dashboard())], f"not a panel's query any more: {expr}"
        wait_for(lambda e=expr: bool(query(prometheus, e)), f"series for {expr}", timeout_s=20)  # type: ignore[misc]
    for _, expr in queries(load_dashboard()):
        query(prometheus, expr)  # each one evaluates (an empty result is fine for, e.g., retries)
