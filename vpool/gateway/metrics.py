"""The gateway's Prometheus metrics, in a registry of its own (no module globals).

The request path counts into plain dicts and lists that a collector turns into metric
families at scrape time: prometheus-client's own counters take a lock on every increment
and its `labels()` builds a key per call, a measurable share of a request that costs
~100 µs in all. The event loop is single-threaded, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from vpool.registry.records import WorkerRecord

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Histograms:
    """Bucket counts and sums per label tuple; rendered cumulatively at scrape."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts per bucket + [+Inf, sum]

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.series.get(labels)
        if counts is None:
            counts = self.series[labels] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        counts[-1] += value

    def family(self, name: str, documentation: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, counts in self.series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts[:-1], strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            family.add_metric(list(labels), buckets, counts[-1])
        return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class GatewayMetrics(Collector):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests: dict[tuple[str, str, str], int] = {}
        self._upstream_errors: dict[str, int] = {}
        self._retries: dict[str, int] = {}
        self._tokens: dict[tuple[str, str, str], int] = {}  # (key name, model, kind)
        # (worker id, its primary model) → its engine's prefix-cache (queried, hit) tokens.
        self._prefix_cache: dict[tuple[str, str], tuple[int, int]] = {}
        self.ejections = 0
        self.client_disconnects = 0
        self._duration = _Histograms()
        self._first_byte = _Histograms()
        r.register(self)
        self.inflight = Gauge("vpool_inflight_requests", "Requests being proxied now.", registry=r)
        self.waiting = Gauge(
            "vpool_waiting_requests",
            "Requests waiting for a fair share of a model whose every worker is full.",
            ["model"],
            registry=r,
        )
        self.ready_workers = Gauge("vpool_ready_workers", "Ready workers per model.", ["model"], registry=r)
        self.registry_up = Gauge(
            "vpool_registry_up", "1 when the registry answered the last refresh.", registry=r
        )
        self.retained_workers = Gauge(
            "vpool_retained_workers",
            "Workers kept in routing although the registry lost them in an outage.",
            registry=r,
        )
        self.ejected_workers = Gauge(
            "vpool_ejected_workers", "Workers out of this gateway's rotation after failing.", registry=r
        )

    # the request path

    def answered(self, route: str, model: str, status: int, elapsed_s: float) -> None:
        key = (route, model, str(status))
        self._requests[key] = self._requests.get(key, 0) + 1
        if status < 400:
            self._duration.observe((route, model), elapsed_s)

    def first_byte(self, route: str, model: str, elapsed_s: float) -> None:
        self._first_byte.observe((route, model), elapsed_s)

    def upstream_error(self, kind: str) -> None:
        self._upstream_errors[kind] = self._upstream_errors.get(kind, 0) + 1

    def retried(self, reason: str) -> None:
        self._retries[reason] = self._retries.get(reason, 0) + 1

    def tokens(self, key_name: str, model: str, prompt: int, completion: int) -> None:
        for kind, count in (("prompt", prompt), ("completion", completion)):
            if count:
                labels = (key_name, model, kind)
                self._tokens[labels] = self._tokens.get(labels, 0) + count

    def ejected(self) -> None:
        self.ejections += 1

    def client_left(self) -> None:
        self.client_disconnects += 1

    # scrape time

    def listed_workers(self, records: Iterable[WorkerRecord]) -> None:
        """Take the workers' own counters from their last heartbeats, replacing the last set:
        a worker that left the registry leaves the metrics with it."""
        self._prefix_cache = {
            (r.worker_id, r.models[0]): (r.load.prefix_cache_queries, r.load.prefix_cache_hits)
            for r in records
            if r.kind == "vpool"  # an external server's heartbeats come from the controller
        }

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "vpool_requests", "Requests answered, by route, model and HTTP status.",
            labels=["route", "model", "status"],
        )  # fmt: skip
        for labels, count in self._requests.items():
            requests.add_metric(list(labels), count)
        yield requests
        errors = CounterMetricFamily(
            "vpool_upstream_errors", "Failures talking to workers, by kind.", labels=["kind"]
        )
        for kind, count in self._upstream_errors.items():
            errors.add_metric([kind], count)
        yield errors
        retries = CounterMetricFamily(
            "vpool_retries", "Requests sent to another worker after a failed attempt, by the failure.",
            labels=["reason"],
        )  # fmt: skip
        for reason, count in self._retries.items():
            retries.add_metric([reason], count)
        yield retries
        yield CounterMetricFamily(
            "vpool_worker_ejections", "Times a failing worker was taken out of this gateway's rotation.",
            value=self.ejections,
        )  # fmt: skip
        yield CounterMetricFamily(
            "vpool_client_disconnects", "Clients that left before their answer ended.",
            value=self.client_disconnects,
        )  # fmt: skip
        tokens = CounterMetricFamily(
            "vpool_tokens", "Tokens the workers counted, by key name (never its secret), model and kind.",
            labels=["key", "model", "kind"],
        )  # fmt: skip
        for labels, count in self._tokens.items():
            tokens.add_metric(list(labels), count)
        yield tokens
        # Counters, not a hit-rate gauge: every gateway replica renders the same values (the
        # registry's), so Prometheus takes a rate over any window and `max by (worker)` drops
        # the duplicates; a restarted worker starts again from 0, which `rate` takes as a reset.
        queried = CounterMetricFamily(
            "vpool_worker_prefix_cache_query_tokens",
            "Prompt tokens each worker's engine looked up in its prefix cache (vllm:prefix_cache_queries).",
            labels=["worker", "model"],
        )
        hit = CounterMetricFamily(
            "vpool_worker_prefix_cache_hit_tokens",
            "Of those, tokens found cached (vllm:prefix_cache_hits): hit / query is the hit rate.",
            labels=["worker", "model"],
        )
        for (worker_id, model), (queries, hits) in self._prefix_cache.items():
            queried.add_metric([worker_id, model], queries)
            hit.add_metric([worker_id, model], hits)
        yield queried
        yield hit
        yield self._duration.family(
            "vpool_request_duration_seconds", "Time from request to last byte.", ["route", "model"]
        )
        yield self._first_byte.family(
            "vpool_time_to_first_byte_seconds", "Time from request to the worker's first byte.",
            ["route", "model"],
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
