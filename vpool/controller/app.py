"""The controller's HTTP API: workers register, heartbeat, drain and leave; admins list them.

    POST   /v1/workers                 register (probes the worker's /health first)
    POST   /v1/workers/{id}/heartbeat  load report; 404 tells the worker to register again
    POST   /v1/workers/{id}/drain      DRAINING: out of routing, in-flight work goes on
    DELETE /v1/workers/{id}            GONE (kept a minute for the admin view)
    GET    /v1/workers                 the fleet, for admins
    GET    /v1/targets                 every gateway and worker, as Prometheus http_sd targets
    GET    /metrics                    the registry's view of the fleet, for Prometheus
    GET    /health

Every route needs the registration token when one is configured (Prometheus sends it with
`authorization` in its `http_sd_configs` and scrape config: the targets are the fleet that
`/v1/workers` shows). While the registry is
away (Redis down or frozen) every route but `/health` answers 503 within the registry's
timeout, workers retry, and `/health` says `degraded`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from vpool.auth import BearerKeys
from vpool.background import cancel_and_wait
from vpool.catalog.catalog import load_catalog
from vpool.config import ControllerSettings, EndpointSpec
from vpool.controller.external import EXTERNAL_TTL_S, ExternalProber
from vpool.controller.fleet_metrics import render_fleet_metrics
from vpool.controller.jobs import JobManager
from vpool.controller.jobs_api import jobs_router
from vpool.controller.keys_api import keys_router
from vpool.controller.probe import probe_health, served_max_model_len
from vpool.controller.schemas import ControllerHealth, WorkerList
from vpool.controller.targets import TargetGroup, target_groups
from vpool.controller.usage_api import usage_router
from vpool.errors import InvalidRequest, NotFound, ServiceUnavailable
from vpool.http_errors import install_error_handlers
from vpool.registry.keys import KeyStore
from vpool.registry.protocol import Registry, RegistryHealth, RegistryUnavailable
from vpool.registry.records import (
    GatewayRecord,
    Registration,
    RegistrationAccepted,
    WorkerLoad,
    WorkerRecord,
    WorkerState,
)

GONE_TTL_S = 60.0
T = TypeVar("T")


class RegistryDown(ServiceUnavailable):
    default_code = "registry_unavailable"


def create_controller_app(
    settings: ControllerSettings,
    registry: Registry,
    endpoints: list[EndpointSpec] | None = None,
    key_store: KeyStore | None = None,
) -> FastAPI:
    """Build the controller over a registry it shares with the gateways (and the key store
    they read, for the keys API)."""
    keys = BearerKeys([settings.registration_token] if settings.registration_token else [])
    ttl = settings.worker_ttl_s
    status = RegistryHealth()

    async def _registry_call(call: Awaitable[T]) -> T:
        """Registry outages answer 503, so workers retry instead of crashing."""
        try:
            return await status.track(call)
        except RegistryUnavailable as exc:
            raise RegistryDown(f"the worker registry is unavailable: {exc}") from exc

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.health_probe_timeout_s) as http:
            app.state.http = http
            prober = app.state.prober = ExternalProber(registry, http, endpoints or [], settings, status)
            jobs = app.state.jobs = JobManager(
                settings, registry, lambda: load_catalog(settings.launch.catalog), http
            )
            tasks = [asyncio.create_task(prober.run()), asyncio.create_task(jobs.run())]
            try:
                yield
            finally:
                for task in tasks:
                    await cancel_and_wait(task)
                await jobs.stop_local()

    async def require_token(request: Request) -> None:
        keys.check(request.headers.get("authorization"))

    app = FastAPI(title="vpool controller", lifespan=lifespan)
    install_error_handlers(app)
    workers = APIRouter(dependencies=[Depends(require_token)])

    @workers.post("/v1/workers", status_code=201)
    async def register(body: Registration, request: Request) -> RegistrationAccepted:
        url = body.url.rstrip("/")
        if not await probe_health(request.app.state.http, url):
            raise InvalidRequest(
                f"worker {body.worker_id} did not answer {url}/health; not registered",
                param="url",
                code="health_probe_failed",
            )
        record = WorkerRecord(**body.model_dump(exclude={"url"}), url=url, state=WorkerState.READY)
        if record.kind == "external" and record.max_model_len is None:
            record.max_model_len = await served_max_model_len(request.app.state.http, url, record.models)
        await _registry_call(registry.put(record, EXTERNAL_TTL_S if record.kind == "external" else ttl))
        if record.kind == "external":
            request.app.state.prober.remember(record)
        return RegistrationAccepted(
            worker_id=record.worker_id,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            ttl_s=ttl,
        )

    @workers.post("/v1/workers/{worker_id}/heartbeat")
    async def heartbeat(worker_id: str, load: WorkerLoad) -> WorkerRecord:
        record = await _registry_call(registry.heartbeat(worker_id, load, ttl))
        if record is None:
            raise NotFound(f"worker {worker_id} is not registered", code="worker_not_found")
        return record

    @workers.post("/v1/workers/{worker_id}/drain")
    async def drain(worker_id: str) -> WorkerRecord:
        # Long TTL: a draining worker stops heartbeating but may serve for minutes.
        record = await _registry_call(
            registry.set_state(worker_id, WorkerState.DRAINING, max(ttl, GONE_TTL_S))
        )
        if record is None:
            raise NotFound(f"worker {worker_id} is not registered", code="worker_not_found")
        return record

    @workers.delete("/v1/workers/{worker_id}")
    async def deregister(worker_id: str, request: Request) -> WorkerRecord:
        request.app.state.prober.forget(worker_id)
        record = await _registry_call(registry.set_state(worker_id, WorkerState.GONE, GONE_TTL_S))
        if record is None:
            raise NotFound(f"worker {worker_id} is not registered", code="worker_not_found")
        return record

    @workers.get("/v1/workers")
    async def list_workers() -> WorkerList:
        records = await _registry_call(registry.list_workers())
        records.sort(key=lambda r: (r.models[0], r.worker_id))
        return WorkerList(data=records)

    @workers.get("/v1/targets")
    async def targets() -> list[TargetGroup]:
        """Prometheus HTTP service discovery (`http_sd_configs`): no host listed by hand."""
        records = await _registry_call(registry.list_workers())
        gateways = await _registry_call(registry.list_gateways())
        return target_groups(records, gateways)

    @workers.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        # A registry outage is a figure here, not a 503: the scrape is how it gets noticed.
        records: list[WorkerRecord] | None = None
        gateways: list[GatewayRecord] | None = None
        with contextlib.suppress(RegistryUnavailable):
            records = await status.track(registry.list_workers())
            gateways = await status.track(registry.list_gateways())
        body = render_fleet_metrics(records, gateways, status)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @workers.get("/health")
    async def health() -> ControllerHealth:
        # From the outcome of recent calls (the endpoint prober makes one every heartbeat
        # interval): no registry call here, so a frozen Redis cannot hold /health.
        return ControllerHealth(
            status="ok" if status.ok else "degraded",
            registry="ok" if status.ok else "unavailable",
            registry_failures=status.failures,
            registry_error=None if status.ok else status.last_error,
        )

    app.include_router(workers)
    app.include_router(jobs_router(settings))
    if key_store is not None:
        app.include_router(keys_router(settings, key_store))
        app.include_router(usage_router(settings, key_store))
    return app
