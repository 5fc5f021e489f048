"""Servers vpool did not start (`vllm serve`, SGLang): the controller heartbeats for them.

Static endpoints come from the config's `endpoints:`; others are registered through the API
with `kind: external`. Each tick the controller probes them all: healthy ones are READY,
unhealthy ones FAILED (kept, and probed again, so they come back by themselves).

Nobody else heartbeats for these servers, so nobody would register them again after Redis
loses its data (a restart without persistence, or a freeze longer than their TTL). Static
ones are rebuilt from the config; the prober also remembers the run-time ones (from their
registration, and from each tick's read of the registry) and writes back any that vanish
without being deregistered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging

import httpx

from vpool.config import ControllerSettings, EndpointSpec
from vpool.controller.probe import probe_health, served_max_model_len
from vpool.registry.protocol import Registry, RegistryHealth, RegistryUnavailable
from vpool.registry.records import WorkerLoad, WorkerRecord, WorkerState

log = logging.getLogger("vpool.controller")

# External records outlive a few missed probes: only the controller keeps them alive.
EXTERNAL_TTL_S = 30.0


def endpoint_worker_id(url: str) -> str:
    return "endpoint-" + hashlib.sha1(url.encode()).hexdigest()[:10]


def endpoint_record(spec: EndpointSpec, state: WorkerState) -> WorkerRecord:
    return WorkerRecord(
        worker_id=endpoint_worker_id(spec.url),
        url=spec.url,
        models=spec.models,
        kind="external",
        state=state,
    )


class ExternalProber:
    def __init__(
        self,
        registry: Registry,
        http: httpx.AsyncClient,
        endpoints: list[EndpointSpec],
        settings: ControllerSettings,
        health: RegistryHealth | None = None,
    ) -> None:
        self._registry = registry
        self._http = http
        self._endpoints = endpoints
        self._interval = settings.heartbeat_interval_s
        self._ttl = max(settings.worker_ttl_s, EXTERNAL_TTL_S)
        # It also keeps the controller's registry status fresh when no worker calls in.
        self._health = health or RegistryHealth()
        # Run-time external servers last seen registered, by id: restored if Redis loses them.
        self._registered: dict[str, WorkerRecord] = {}

    def remember(self, record: WorkerRecord) -> None:
        """A server just registered at run time: restore it if Redis loses it, even before
        the next tick has read it back."""
        self._registered[record.worker_id] = record

    def forget(self, worker_id: str) -> None:
        """Deregistered: let it go for good."""
        self._registered.pop(worker_id, None)

    async def run(self) -> None:
        while True:
            # RegistryHealth logs the outage once; retry on the next tick.
            with contextlib.suppress(RegistryUnavailable):
                await self._health.track(self.tick())
            await asyncio.sleep(self._interval)

    async def tick(self) -> None:
        static_ids = {endpoint_worker_id(ep.url) for ep in self._endpoints}
        external = {
            r.worker_id: r
            for r in await self._registry.list_workers()
            if r.kind == "external" and r.worker_id not in static_ids
        }
        lost = [r for wid, r in self._registered.items() if wid not in external and wid not in static_ids]
        registered = [r for r in external.values() if r.state != WorkerState.GONE]
        self._registered = {r.worker_id: r for r in [*registered, *lost]}
        await asyncio.gather(
            *(self._refresh_static(ep) for ep in self._endpoints),
            *(self._refresh_registered(r) for r in registered),
            *(self._restore(r) for r in lost),
        )

    async def _refresh_static(self, spec: EndpointSpec) -> None:
        healthy = await probe_health(self._http, spec.url)
        state = WorkerState.READY if healthy else WorkerState.FAILED
        worker_id = endpoint_worker_id(spec.url)
        current = await self._registry.heartbeat(worker_id, WorkerLoad(), self._ttl)
        if current is None or current.state != state:
            record = endpoint_record(spec, state)
            if healthy:
                record.max_model_len = await served_max_model_len(self._http, spec.url, spec.models)
            await self._registry.put(record, self._ttl)

    async def _restore(self, record: WorkerRecord) -> None:
        healthy = await probe_health(self._http, record.url)
        state = WorkerState.READY if healthy else WorkerState.FAILED
        log.warning("external server %s vanished from the registry; registering it again", record.worker_id)
        await self._registry.put(record.model_copy(update={"state": state, "load": WorkerLoad()}), self._ttl)

    async def _refresh_registered(self, record: WorkerRecord) -> None:
        healthy = await probe_health(self._http, record.url)
        state = WorkerState.READY if healthy else WorkerState.FAILED
        await self._registry.heartbeat(record.worker_id, WorkerLoad(), self._ttl)
        if record.state != state:
            await self._registry.set_state(record.worker_id, state, self._ttl)
