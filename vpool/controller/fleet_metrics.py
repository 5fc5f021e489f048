"""The controller's `/metrics`: the fleet as the registry holds it, read at scrape time.

Gateways count what they route and workers what they generate; the controller adds the one
view nobody else has, the registry's: workers per model and state, gateways announced, and
whether the registry answers. Built from one listing per scrape, with no state of its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vpool.registry.protocol import RegistryHealth
from vpool.registry.records import GatewayRecord, WorkerRecord


class _Snapshot(Collector):
    def __init__(
        self, workers: list[WorkerRecord] | None, gateways: list[GatewayRecord] | None, health: RegistryHealth
    ) -> None:
        self._workers, self._gateways, self._health = workers, gateways, health

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "vpool_controller_registry_up", "1 when the registry answered this scrape's listing.",
            value=1 if self._workers is not None and self._gateways is not None else 0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "vpool_controller_registry_failures", "Registry calls that failed since the controller started.",
            value=self._health.failures,
        )  # fmt: skip
        workers = GaugeMetricFamily(
            "vpool_controller_workers", "Registered workers, by model (first served name) and state.",
            labels=["model", "state"],
        )  # fmt: skip
        counts = Counter((w.models[0], w.state.value) for w in self._workers or ())
        for (model, state), count in sorted(counts.items()):
            workers.add_metric([model, state], count)
        yield workers
        if self._gateways is not None:
            yield GaugeMetricFamily(
                "vpool_controller_gateways", "Gateways announced in the registry.", value=len(self._gateways)
            )


def render_fleet_metrics(
    workers: list[WorkerRecord] | None, gateways: list[GatewayRecord] | None, health: RegistryHealth
) -> bytes:
    """Prometheus text; `None` listings mean the registry did not answer."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(workers, gateways, health))
    return generate_latest(registry)
