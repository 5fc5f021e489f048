"""deploy/: the Grafana dashboard, its provisioning, and the Prometheus config, checked offline.

PromQL and the Prometheus config are parsed by promtool (Debian's `prometheus` package), the
real parser: without it these tests fail, they do not skip. Whether the metrics exist on real
gateways and workers is tests/integration/test_monitoring.py's job; here the gateway's and
the controller's own metric names are checked against what their code renders.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboard import (
    PROMETHEUS_YML,
    ROOT,
    exposed_names,
    load_dashboard,
    metric_names,
    panels,
    prometheus_config_with_token,
    queries,
)
from vpool.controller.fleet_metrics import render_fleet_metrics
from vpool.gateway.metrics import GatewayMetrics
from vpool.registry.protocol import RegistryHealth
from vpool.registry.records import GatewayRecord, WorkerRecord

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
PANEL_TYPES = {"timeseries", "stat", "bargauge", "gauge", "table"}
# PromQL functions and aggregations the dashboard may use (Prometheus 2.x).
FUNCTIONS = {
    "sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile",
    "rate", "irate", "increase", "delta", "histogram_quantile", "clamp_min", "clamp_max",
}  # fmt: skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (scripts/test.sh does)")
    return path


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def test_the_dashboard_is_a_grafana_dashboard_whose_panels_query_the_provisioned_prometheus(
    dashboard: dict[str, Any],
) -> None:
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][
        0
    ]
    assert dashboard["uid"] == "vpool" and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    found = panels(dashboard)
    assert len(found) >= 12
    for panel in found:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["title"] and panel["description"]
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert panel["targets"], f"{panel['title']} queries nothing"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]


def test_no_two_panels_overlap_and_all_fit_the_24_column_grid(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


def test_every_query_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    exprs = [expr for _, expr in queries(dashboard)]
    for expr in exprs:
        assert _balanced(expr), expr
        for function in re.findall(r"([A-Za-z_]+)\s*\(", expr):
            assert function in FUNCTIONS | {"by", "without"}, f"unknown function {function} in {expr}"
    recorded = [{"record": f"vpool:check{i}", "expr": expr} for i, expr in enumerate(exprs)]
    rules = {"groups": [{"name": "dashboard", "rules": recorded}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


def test_promtool_would_refuse_a_broken_query(tmp_path: Path) -> None:
    """The check above can fail: promtool is really parsing."""
    path = tmp_path / "rules.yml"
    bad = "sum by (model) (rate(vpool_requests_total[1m])"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": bad}]}]}))
    assert subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True).returncode != 0


def test_the_dashboard_covers_what_an_operator_watches(dashboard: dict[str, Any]) -> None:
    queried = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    wanted = {
        "vpool_requests_total",  # requests and errors by kind
        "vpool_upstream_errors_total",
        "vpool_time_to_first_byte_seconds_bucket",  # TTFT and latency quantiles
        "vpool_request_duration_seconds_bucket",
        "vpool_retries_total",
        "vpool_worker_ejections_total",
        "vpool_ready_workers",  # ready workers per model
        "vpool_waiting_requests",  # queue: fair share, and the engine's
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",  # KV-cache use per worker
        "vllm:generation_tokens_total",  # generation throughput
        "vpool_tokens_total",  # tokens per key
        "vpool_worker_prefix_cache_hit_tokens_total",  # whether routing lands on cached prefixes
        "vpool_worker_prefix_cache_query_tokens_total",
    }
    assert wanted <= queried, wanted - queried


def test_every_gateway_and_controller_metric_the_dashboard_queries_is_one_they_render(
    dashboard: dict[str, Any],
) -> None:
    gateway = GatewayMetrics()
    rendered = exposed_names(gateway.render().decode())
    worker = WorkerRecord(worker_id="w", url="http://w:1", models=["m"])
    health = RegistryHealth()
    rendered |= exposed_names(
        render_fleet_metrics([worker], [GatewayRecord(url="http://g:1")], health).decode()
    )
    for title, expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"{title}: no metric found in {expr}"
        for name in names:
            if not name.startswith("vllm:"):  # vLLM's own: checked against a real worker
                assert name in rendered, f"{title} queries {name}, which vpool does not export"


def test_metric_names_finds_the_selected_metrics_and_nothing_else() -> None:
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{route="/v1/chat(s)", a=~"b"}[1m])))'
    assert metric_names(expr) == {"x_bucket"}
    assert metric_names("sum(vllm:num_requests_waiting) / on (instance) group_left up") == {
        "vllm:num_requests_waiting",
        "up",
    }


def test_prometheus_config_discovers_the_fleet_from_the_controller_and_scrapes_it() -> None:
    result = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert [sd["url"] for sd in jobs["vpool"]["http_sd_configs"]] == ["http://controller:8001/v1/targets"]
    assert "static_configs" not in jobs["vpool"]  # no host listed by hand
    assert jobs["vpool-controller"]["static_configs"] == [{"targets": ["controller:8001"]}]


def test_prometheus_config_with_the_registration_token_as_its_comments_say_is_valid(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-token")
    path = tmp_path / "prometheus.yml"
    path.write_text(prometheus_config_with_token(token))
    result = subprocess.run([promtool(), "check", "config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"]: job for job in yaml.safe_load(path.read_text())["scrape_configs"]}
    expected = {"type": "Bearer", "credentials_file": str(token)}
    assert jobs["vpool"]["http_sd_configs"][0]["authorization"] == expected
    assert jobs["vpool-controller"]["authorization"] == expected


def test_grafana_provisioning_points_at_prometheus_and_the_mounted_dashboard() -> None:
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert (source["type"], source["url"], source["access"]) == (
        "prometheus",
        "http://prometheus:9090",
        "proxy",
    )
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "vpool.yml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"  # compose mounts vpool.json there


def _balanced(expr: str) -> bool:
    depth = {"(": 0, "[": 0, "{": 0}
    closing = {")": "(", "]": "[", "}": "{"}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for char in text:
        if char in depth:
            depth[char] += 1
        elif char in closing:
            depth[closing[char]] -= 1
            if depth[closing[char]] < 0:
                return False
    return not any(depth.values())
