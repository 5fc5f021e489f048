"""A worker's vLLM `/metrics`, read into the few figures `vpool metrics` shows."""

from __future__ import annotations

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel


class WorkerMetrics(BaseModel):
    """Totals and gauges at `at` (Unix time); throughput is the difference of two readings."""

    worker_url: str
    at: float
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0  # 0..1
    successful_requests_total: float = 0.0
    request_latency_sum_s: float = 0.0
    request_latency_count: float = 0.0
    error: str | None = None  # the worker could not be read

    @property
    def average_latency_s(self) -> float | None:
        return self.request_latency_sum_s / self.request_latency_count if self.request_latency_count else None


# vLLM's metric (as prometheus_client names the family) → our field; samples are summed.
_FAMILIES = {
    "vllm:prompt_tokens": ("prompt_tokens_total", "_total"),
    "vllm:generation_tokens": ("generation_tokens_total", "_total"),
    "vllm:num_requests_running": ("requests_running", ""),
    "vllm:num_requests_waiting": ("requests_waiting", ""),
    "vllm:kv_cache_usage_perc": ("kv_cache_usage", ""),
    "vllm:request_success": ("successful_requests_total", "_total"),
}


def parse_vllm_metrics(text: str, worker_url: str, at: float | None = None) -> WorkerMetrics:
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in _FAMILIES:
            field, suffix = _FAMILIES[family.name]
            figures[field] = sum(s.value for s in family.samples if s.name == family.name + suffix)
        elif family.name == "vllm:e2e_request_latency_seconds":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    figures["request_latency_sum_s"] = (
                        figures.get("request_latency_sum_s", 0.0) + sample.value
                    )
                elif sample.name.endswith("_count"):
                    figures["request_latency_count"] = (
                        figures.get("request_latency_count", 0.0) + sample.value
                    )
    return WorkerMetrics(worker_url=worker_url, at=time.time() if at is None else at, **figures)


async def read_worker_metrics(http: httpx.AsyncClient, worker_url: str) -> WorkerMetrics:
    try:
        resp = await http.get(f"{worker_url}/metrics")
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        return WorkerMetrics(worker_url=worker_url, at=time.time(), error=f"{type(exc).__name__}: {exc}")
    return parse_vllm_metrics(resp.text, worker_url)
