"""The gateway's Prometheus metrics, in a registry of its own (no module globals).

The request path counts into plain dicts and lists that a collector turns into metric
families at scrape time: prometheus-client's own counters take a lock on every increment
and its `labels()` builds a key per call, a measurable share of a request that costs
~100 µs in all. The event loop is single-threaded, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

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
        self.ejections = 0
        self.client_disconnects = 0
        self._duration = _Histograms()
        self._first_byte = _Histograms()
        r.register(self)
        self.inflight = Gauge("vpool_inflight_requests", "Requests being proxied now.", registry=r)
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

    def ejected(self) -> None:
        self.ejections += 1

    def client_left(self) -> None:
        self.client_disconnects += 1

    # scrape time

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
        yield self._duration.family(
            "vpool_request_duration_seconds", "Time from request to last byte.", ["route", "model"]
        )
        yield self._first_byte.family(
            "vpool_time_to_first_byte_seconds", "Time from request to the worker's first byte.",
            ["route", "model"],
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
