"""The gateway: a FastAPI app over the fleet, `create_app(settings, registry)`.

The data routes (every POST that names a model) are raw ASGI, answered by the `DataRoutes`
middleware before FastAPI's router sees them (vpool/gateway/data_routes.py); the rest are
ordinary FastAPI routes with pydantic models: `GET /v1/models`, `GET /v1/models/{model}`,
`/health`, `/metrics`, and `/docs` with `/openapi.json`, which describe both kinds. Teams
may add their own routes and middleware to the app as to any FastAPI app; middleware added
after `create_app` wraps the data routes too.

What requests share (fleet view, upstream pool, metrics) is built in the lifespan: in the
lifespan state for requests, and at `app.state.gateway` for code beside the app.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

from vpool.auth import single_authorization
from vpool.config import Settings
from vpool.errors import ModelNotFound
from vpool.gateway.api_models import ErrorResponse, GatewayHealth, ModelCard, ModelList
from vpool.gateway.console import install_console
from vpool.gateway.data_routes import DataRoutes, serve_data_route
from vpool.gateway.docs import install_docs
from vpool.gateway.routing import RoutingPolicy
from vpool.gateway.state import GatewayState
from vpool.http_errors import install_error_handlers
from vpool.registry.keys import ApiKey, KeyStore
from vpool.registry.protocol import Registry

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_ERRORS: dict[int | str, dict[str, Any]] = {401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


class GatewayApp(FastAPI):
    """FastAPI, with the data routes answered before its middleware stack while no team has
    added middleware of its own: Starlette's error middleware and the call chain cost 2-3 µs
    of a data request's ~45 µs here (benchmarks/README.md). With middleware added, the data
    routes run inside it (`DataRoutes`, innermost), as any route would."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(self.user_middleware) == 1:
            if await serve_data_route(scope, receive, send):
                return
        await super().__call__(scope, receive, send)


def create_app(
    settings: Settings,
    registry: Registry,
    policy: RoutingPolicy | None = None,
    key_store: KeyStore | None = None,
) -> FastAPI:
    """The gateway over `registry` (and the key store its settings name, unless given);
    serve it with `vpool.gateway.server.gateway_server`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, GatewayState]]:
        state = GatewayState(settings, registry, policy, key_store)
        await state.start()
        app.state.gateway = state
        # What exists now (modules, the app, its routes and models) lives as long as the
        # process: leave it out of every garbage collection from here on. A full collection
        # walked it all, about 20 ms in which no request moved.
        gc.collect()
        gc.freeze()
        try:
            yield {"gateway": state}
        finally:
            await state.close()

    app = GatewayApp(
        title="vpool gateway",
        version="0.1.0",
        description="One OpenAI-compatible endpoint in front of a pool of vLLM workers, routed by `model`.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(DataRoutes)

    async def require_key(request: Request) -> ApiKey | None:
        authorization = single_authorization(request.headers.getlist("authorization"))
        return _state(request).keys.check(authorization, request.client.host if request.client else "")

    # `max_model_len` is left out where no worker reports it.
    listing: dict[str, Any] = {
        "responses": _ERRORS, "tags": ["models"],
        "response_model_exclude_none": True,
    }  # fmt: skip

    @app.get("/v1/models", **listing)
    async def list_models(request: Request) -> ModelList:
        """Every model with at least one ready worker that the caller's key may use."""
        key = await require_key(request)
        fleet = _state(request).fleet
        names = [name for name in fleet.ready_models() if key is None or key.allows(name)]
        return ModelList(data=[_card(request, name) for name in names])

    @app.get("/v1/models/{model:path}", **listing)
    async def retrieve_model(model: str, request: Request) -> ModelCard:
        """One model, if a worker is ready to serve it and the caller's key may use it."""
        key = await require_key(request)
        if not _state(request).fleet.ready_count(model) or (key is not None and not key.allows(model)):
            raise ModelNotFound(model)
        return _card(request, model)

    @app.head("/health", include_in_schema=False)
    @app.get("/health", tags=["operations"])
    async def health(request: Request) -> GatewayHealth:
        """Whether the gateway routes on a fleet the registry confirms, and what is ready."""
        state = _state(request)
        fleet = state.fleet
        stores_ok = state.keys.store_ok and state.meter.store_ok and state.limiter.mode != "degraded"
        return GatewayHealth(
            # Degraded: routing on a snapshot the registry does not (or cannot) confirm,
            # because it is away or lost workers that have not registered again yet; or keys,
            # limits or usage working from this gateway's own copy while their store is away.
            status="ok" if fleet.registry_ok and not fleet.retained and stores_ok else "degraded",
            registry="ok" if fleet.registry_ok else "unavailable",
            models={name: fleet.ready_count(name) for name in fleet.ready_models()},
            retained_workers=len(fleet.retained),
            last_refresh_age_s=round(time.time() - fleet.last_refresh, 3) if fleet.last_refresh else None,
            keys="ok" if state.keys.store_ok else "unavailable",
            limits=state.limiter.mode,
            gateways_sharing_limits=state.limiter.gateways_alive,
            usage="ok" if state.meter.store_ok else "unavailable",
            waiting=state.fair_share.waiting_per_model(),
        )

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["operations"],
        responses={200: {"content": {PROMETHEUS_CONTENT_TYPE: {"schema": {"type": "string"}}}}},
    )
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        state = _state(request)
        m, fleet = state.metrics, state.fleet
        m.registry_up.set(1 if fleet.registry_ok else 0)
        m.inflight.set(sum(fleet.inflight.values()))
        m.ejected_workers.set(len(fleet.ejector.ejected()))
        m.retained_workers.set(len(fleet.retained))
        m.waiting.clear()
        for name, waiting in state.fair_share.waiting_per_model().items():
            m.waiting.labels(name).set(waiting)
        m.ready_workers.clear()
        for name in fleet.ready_models():
            m.ready_workers.labels(name).set(fleet.ready_count(name))
        m.listed_workers([*fleet.records, *fleet.retained])
        return Response(m.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    install_docs(app)
    install_console(app)
    return app


def _state(request: Request) -> GatewayState:
    state: GatewayState = request.state.gateway
    return state


def _card(request: Request, name: str) -> ModelCard:
    return ModelCard(id=name, max_model_len=_state(request).fleet.max_model_len(name))
