"""vpool's Grafana dashboard as tests read it: its queries, and the metric names they use.

`metric_names` reads a PromQL expression the way Prometheus's lexer would for this purpose:
strings, label matchers, ranges and grouping clauses hold no metric names, a name followed by
`(` is a function, and the rest of the identifiers are metrics. Good for the dashboard's own
expressions (no `offset`, no `@`, no subqueries), which the unit tests also parse with
promtool.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "vpool.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SHIPPED_TOKEN_FILE = "/etc/prometheus/vpool-registration-token"

# Grafana's interval variables, as Prometheus sees them once Grafana has filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")


def prometheus_config_with_token(token_file: Path) -> str:
    """deploy/prometheus/prometheus.yml as its comments say to run it with a registration
    token: the `authorization` blocks uncommented, reading `token_file`."""
    text = re.sub(
        r"(?m)^(\s*)# (authorization:|  type: Bearer|  credentials_file: )",
        r"\1\2",
        PROMETHEUS_YML.read_text(),
    )
    assert text.count(SHIPPED_TOKEN_FILE) == 2, "the shipped config no longer documents the token"
    return text.replace(SHIPPED_TOKEN_FILE, str(token_file))


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows excluded), nested rows' panels included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, Grafana's variables filled in."""
    return [(p["title"], fill_variables(t["expr"])) for p in panels(dashboard) for t in p["targets"]]


def fill_variables(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    text = _GROUPING.sub(" ", _RANGES.sub(" ", _MATCHERS.sub(" ", _STRINGS.sub('""', expr))))
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if not call and name not in _KEYWORDS:
            names.add(name)
    return names


def exposed_names(exposition: str) -> set[str]:
    """The series names a `/metrics` text offers to queries: every sample's, and for each
    declared family the names its type implies, so a counter nobody has incremented yet
    (declared, no sample) still counts as existing."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names
