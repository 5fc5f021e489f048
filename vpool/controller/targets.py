"""The fleet as Prometheus HTTP service discovery target groups (`GET /v1/targets`).

The body is what Prometheus's `http_sd_configs` reads: a JSON list of
`{"targets": ["host:port"], "labels": {...}}`, one group per gateway and per worker, so a
scrape config lists no hosts. Labels a dashboard can group by:

    vpool_role        gateway | worker
    vpool_worker_id   the worker's id                      (workers)
    vpool_model       the model it serves (its first name) (workers)
    vpool_runner      generate | pooling                   (workers)
    __scheme__, __metrics_path__   from the URL, so a worker behind a path prefix or TLS is
                                   scraped where it serves (Prometheus drops them after use)

Only labels fixed for a target's life: a state (READY, DRAINING) would start new series at
each change. GONE workers have stopped and are left out.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import BaseModel

from vpool.registry.records import GatewayRecord, WorkerRecord, WorkerState


class TargetGroup(BaseModel):
    targets: list[str]
    labels: dict[str, str]


def target_groups(workers: list[WorkerRecord], gateways: list[GatewayRecord]) -> list[TargetGroup]:
    """Gateways first, then workers by model and id: a stable body, easy to diff."""
    groups = [_group(g.url, {"vpool_role": "gateway"}) for g in sorted(gateways, key=lambda g: g.url)]
    for worker in sorted(workers, key=lambda w: (w.models[0], w.worker_id)):
        if worker.state == WorkerState.GONE:
            continue
        labels = {
            "vpool_role": "worker",
            "vpool_worker_id": worker.worker_id,
            "vpool_model": worker.models[0],
            "vpool_runner": worker.runner,
        }
        groups.append(_group(worker.url, labels))
    return groups


def _group(url: str, labels: dict[str, str]) -> TargetGroup:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    meta = {"__scheme__": parts.scheme, "__metrics_path__": parts.path.rstrip("/") + "/metrics"}
    return TargetGroup(targets=[f"{host}:{port}"], labels={**labels, **meta})
