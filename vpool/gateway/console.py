"""The web console at `/ui`: a fleet page and a chat playground, served from the package.

The pages are static files in vpool/gateway/console/ (HTML, CSS and vanilla JavaScript: no
framework, no CDN, no build step), public like any login page. What they show comes from
routes behind the gateway's API key, which the page asks for and keeps in sessionStorage:
`GET /ui/api/fleet` below, which it polls every 2 s, and the OpenAI routes themselves
(`/v1/models`, `/v1/chat/completions` streamed) for the playground.

The fleet view is this gateway's own (its last refresh of the registry, and its requests in
flight), plus the job records read from the registry on each call. When the registry is away
the answer is the view as it stands, no jobs, and `registry: unavailable`: never a 5xx.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from vpool.auth import single_authorization
from vpool.gateway.api_models import ErrorResponse
from vpool.gateway.state import GatewayState
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.records import JobRecord, JobState, WorkerRecord, WorkerState

log = logging.getLogger("vpool.gateway")

STATIC_DIR = Path(__file__).with_name("console")
# The pages load nothing from anywhere else, and the browser is told to refuse it if they try.
CONSOLE_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Revalidate (ETag) on every load, so a gateway upgrade never runs yesterday's script.
    "cache-control": "no-cache",
}


class ConsoleModel(BaseModel):
    name: str
    ready_workers: int = Field(description="workers READY to serve it, as this gateway routes")
    workers: int = Field(description="workers listed for it, in any state")
    max_model_len: int | None = Field(None, description="the smallest context its ready workers take")
    runner: Literal["generate", "pooling"] | None = Field(None, description="None: no worker listed")


class ConsoleWorker(BaseModel):
    worker_id: str
    models: list[str]
    state: WorkerState
    kind: Literal["vpool", "external"]
    runner: Literal["generate", "pooling"]
    running: int
    waiting: int
    kv_cache_usage: float = Field(description="0 to 1")
    prefix_cache_queries: int = Field(0, description="prompt tokens its engine looked up in its prefix cache")
    prefix_cache_hits: int = Field(0, description="of those, tokens found cached")
    prefix_cache_hit_rate: float | None = Field(
        None, description="hits / queries since its engine started, 0 to 1; None: it reports no lookups"
    )
    inflight: int = Field(description="this gateway's requests in flight on it")
    last_heartbeat_age_s: float
    retained: bool = Field(False, description="kept in routing after the registry lost it in an outage")
    ejected: bool = Field(False, description="out of this gateway's rotation for a while after failures")


class ConsoleJob(BaseModel):
    job_id: str
    model: str
    launcher: str
    state: JobState
    reason: str | None
    submitted_at: float
    updated_at: float
    worker_ids: list[str]


class ConsoleFleet(BaseModel):
    registry: Literal["ok", "unavailable"] = Field(
        description="unavailable: the workers are this gateway's last view and jobs are not listed"
    )
    now: float = Field(description="the gateway's clock (Unix seconds)")
    last_refresh_age_s: float | None
    models: list[ConsoleModel]
    workers: list[ConsoleWorker]
    jobs: list[ConsoleJob]


class _ConsoleFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(CONSOLE_HEADERS)
        return response


def install_console(app: FastAPI) -> None:
    """Serve the console at `/ui` and its data at `/ui/api/fleet`."""

    async def require_key(request: Request) -> None:
        authorization = single_authorization(request.headers.getlist("authorization"))
        _state(request).keys.check(authorization, request.client.host if request.client else "")

    @app.get(
        "/ui/api/fleet",
        dependencies=[Depends(require_key)],
        responses={401: {"model": ErrorResponse}},
        tags=["console"],
    )
    async def console_fleet(request: Request) -> ConsoleFleet:
        """The fleet as this gateway sees it, and the launched jobs: what `/ui` shows."""
        return await fleet_view(_state(request))

    @app.get("/ui", include_in_schema=False)
    async def console_root() -> RedirectResponse:
        # Relative, so it holds behind a proxy that serves the gateway under a prefix.
        return RedirectResponse("ui/", status_code=308)

    app.mount("/ui", _ConsoleFiles(directory=STATIC_DIR, html=True), name="console")


async def fleet_view(state: GatewayState) -> ConsoleFleet:
    fleet = state.fleet
    now = time.time()
    registry_ok = fleet.registry_ok
    jobs: list[ConsoleJob] = []
    if registry_ok:  # while the refresh finds it away, don't wait out its timeout per poll
        try:
            jobs = [_job(j) for j in await state.registry.list_jobs()]
        except RegistryUnavailable as exc:
            log.debug("console: jobs not listed, registry unavailable: %s", exc)
            registry_ok = False
    retained = {w.worker_id for w in fleet.retained}
    ejected = set(fleet.ejector.ejected())
    records = sorted([*fleet.records, *fleet.retained], key=lambda r: (r.models[0], r.worker_id))
    workers = [
        _worker(r, now, fleet.inflight.get(r.worker_id, 0), r.worker_id in retained, ejected) for r in records
    ]
    return ConsoleFleet(
        registry="ok" if registry_ok else "unavailable",
        now=now,
        last_refresh_age_s=round(now - fleet.last_refresh, 3) if fleet.last_refresh else None,
        models=_models(state, records),
        workers=workers,
        jobs=jobs,
    )


def _job(job: JobRecord) -> ConsoleJob:
    return ConsoleJob(
        job_id=job.job_id,
        model=job.model,
        launcher=job.launcher,
        state=job.state,
        reason=job.reason,
        submitted_at=job.submitted_at,
        updated_at=job.updated_at,
        worker_ids=list(job.worker_ids),
    )


def _worker(
    record: WorkerRecord, now: float, inflight: int, retained: bool, ejected: set[str]
) -> ConsoleWorker:
    load = record.load
    return ConsoleWorker(
        worker_id=record.worker_id,
        models=list(record.models),
        state=record.state,
        kind=record.kind,
        runner=record.runner,
        running=load.running,
        waiting=load.waiting,
        kv_cache_usage=load.kv_cache_usage,
        prefix_cache_queries=load.prefix_cache_queries,
        prefix_cache_hits=load.prefix_cache_hits,
        prefix_cache_hit_rate=_hit_rate(load.prefix_cache_hits, load.prefix_cache_queries),
        inflight=inflight,
        last_heartbeat_age_s=round(max(0.0, now - record.last_heartbeat), 3),
        retained=retained,
        ejected=record.worker_id in ejected,
    )


def _hit_rate(hits: int, queries: int) -> float | None:
    return round(min(hits, queries) / queries, 4) if queries > 0 else None


def _models(state: GatewayState, records: list[WorkerRecord]) -> list[ConsoleModel]:
    """Every model the catalog names or a listed worker serves, ready or not."""
    fleet = state.fleet
    listed: dict[str, list[WorkerRecord]] = {name: [] for name in state.settings.catalog_names()}
    for record in records:
        for name in record.models:
            listed.setdefault(name, []).append(record)
    for name in fleet.ready_models():
        listed.setdefault(name, [])
    return [
        ConsoleModel(
            name=name,
            ready_workers=fleet.ready_count(name),
            workers=len(workers),
            max_model_len=fleet.max_model_len(name),
            runner=workers[0].runner if workers else None,
        )
        for name, workers in sorted(listed.items())
    ]


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state
