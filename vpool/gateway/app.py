"""The gateway: the public OpenAI API over the fleet.

The request path, in order: key check → body (read once by the connection) → model and
stream checked → worker chosen from the in-memory fleet view → original bytes forwarded →
answer streamed back. Routes are plain functions in a dict: no framework, no validation
or dependency injection per request (see http1.py for why).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson

from vpool.auth import BearerKeys
from vpool.background import cancel_and_wait
from vpool.config import Settings
from vpool.controller.registry import Registry
from vpool.errors import InvalidRequest, NotFound, RequestTooLarge, VpoolError
from vpool.gateway.ejection import Ejector
from vpool.gateway.fleet import Fleet
from vpool.gateway.http1 import ClientConnection, ConnectionLimits, IncomingRequest
from vpool.gateway.metrics import GatewayMetrics
from vpool.gateway.proxy import Proxy, resolve_timeouts
from vpool.gateway.request_body import parse_openai_request
from vpool.gateway.routing import RoutingPolicy, make_policy
from vpool.gateway.upstream import UpstreamPool

PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
OPENAI_ROUTES = {
    b"/v1/chat/completions": "chat",
    b"/v1/completions": "completions",
    b"/v1/embeddings": "embeddings",
}

Route = Callable[[IncomingRequest, ClientConnection], None]


class Gateway:
    """Routes requests; owns the fleet view, the upstream pool and the metrics."""

    def __init__(self, settings: Settings, registry: Registry, policy: RoutingPolicy | None = None) -> None:
        g = settings.gateway
        self.settings = settings
        self.keys = BearerKeys(g.api_keys)
        self.fleet = Fleet(
            registry,
            policy or make_policy(g.routing),
            settings.catalog_names(),
            g.refresh_interval_s,
            # The workers' TTL, as the controller sets it: give gateways the same `controller:`.
            expiry_window_s=settings.controller.worker_ttl_s,
            ejector=Ejector(g.eject_after_failures, g.eject_cooldown_s, g.eject_max_cooldown_s),
        )
        self.metrics = GatewayMetrics()
        self.pool = UpstreamPool(g.connect_timeout_s)
        timeouts, model_timeouts = resolve_timeouts(settings)
        self.proxy = Proxy(
            self.pool, self.fleet, self.metrics, g.max_attempts, timeouts, model_timeouts, g.retry_backoff_s
        )
        self.limits = ConnectionLimits(
            max_body_bytes=g.max_body_bytes,
            read_timeout_s=g.request_read_timeout_s,
            too_slow=InvalidRequest(
                f"The request did not arrive within {g.request_read_timeout_s:g} s.", code="request_timeout"
            ).json(),
            too_large=_too_large,
            bad_request=InvalidRequest("Malformed HTTP request.", code="malformed_http").json(),
            head_too_large=InvalidRequest(
                "The request line and headers are too large.", code="headers_too_large"
            ).json(),
        )
        self._get_routes: dict[bytes, Route] = {
            b"/v1/models": self._models,
            b"/health": self._health,
            b"/metrics": self._metrics,
        }
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.fleet.refresh()
        self._background = [
            asyncio.create_task(self.fleet.run()),
            asyncio.create_task(self.proxy.watch_timeouts()),
        ]

    async def close(self) -> None:
        for task in self._background:
            await cancel_and_wait(task)
        self.pool.close()

    def handle(self, request: IncomingRequest, conn: ClientConnection) -> None:
        """Answer one request (the connection's RequestHandler)."""
        try:
            route = OPENAI_ROUTES.get(request.path)
            if route is not None:
                if request.method != b"POST":
                    raise _MethodNotAllowed(request)
                self.keys.check(_header(request, b"authorization"))
                parsed = parse_openai_request(request.body)
                self.proxy.forward(route, request.path, parsed, conn)
                return
            get_route = self._get_routes.get(request.path)
            if get_route is None:
                raise _UnknownRoute(request)
            if request.method not in (b"GET", b"HEAD"):
                raise _MethodNotAllowed(request)
            get_route(request, conn)
        except VpoolError as exc:
            self.metrics.answered(OPENAI_ROUTES.get(request.path, "other"), "-", exc.status_code, 0.0)
            headers = [(k.encode(), v.encode()) for k, v in exc.headers.items()]
            conn.respond(exc.status_code, exc.json(), headers=headers)

    def _models(self, request: IncomingRequest, conn: ClientConnection) -> None:
        self.keys.check(_header(request, b"authorization"))
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "vpool"}
            for name in self.fleet.ready_models()
        ]
        conn.respond(200, orjson.dumps({"object": "list", "data": data}))

    def _health(self, request: IncomingRequest, conn: ClientConnection) -> None:
        # Degraded: routing on a snapshot the registry does not (or cannot) confirm, either
        # because it is away or because it lost workers that have not registered again yet.
        fleet = self.fleet
        body = {
            "status": "ok" if fleet.registry_ok and not fleet.retained else "degraded",
            "registry": "ok" if fleet.registry_ok else "unavailable",
            "models": {name: fleet.ready_count(name) for name in fleet.ready_models()},
            "retained_workers": len(fleet.retained),
            "last_refresh_age_s": round(time.time() - fleet.last_refresh, 3) if fleet.last_refresh else None,
        }
        conn.respond(200, orjson.dumps(body))

    def _metrics(self, request: IncomingRequest, conn: ClientConnection) -> None:
        m, fleet = self.metrics, self.fleet
        m.registry_up.set(1 if fleet.registry_ok else 0)
        m.inflight.set(sum(fleet.inflight.values()))
        m.ejected_workers.set(len(fleet.ejector.ejected()))
        m.retained_workers.set(len(fleet.retained))
        m.ready_workers.clear()
        for name in fleet.ready_models():
            m.ready_workers.labels(name).set(fleet.ready_count(name))
        conn.respond(200, m.render(), content_type=PROMETHEUS_CONTENT_TYPE)


def create_gateway_app(
    settings: Settings, registry: Registry, policy: RoutingPolicy | None = None
) -> Gateway:
    """Build a gateway over `registry`; serve it with `vpool.gateway.server.GatewayServer`."""
    return Gateway(settings, registry, policy)


def _header(request: IncomingRequest, name: bytes) -> str | None:
    value = request.headers.get(name)
    return value.decode("latin-1") if value is not None else None


def _too_large(limit: int) -> tuple[int, bytes]:
    return 413, RequestTooLarge(f"The request body is larger than the limit of {limit} bytes.").json()


class _UnknownRoute(NotFound):
    default_code = "unknown_route"

    def __init__(self, request: IncomingRequest) -> None:
        super().__init__(f"Unknown route: {request.method.decode()} {request.path.decode('latin-1')}")


class _MethodNotAllowed(InvalidRequest):
    status_code = 405
    default_code = "method_not_allowed"

    def __init__(self, request: IncomingRequest) -> None:
        allowed = "POST" if request.path in OPENAI_ROUTES else "GET"
        super().__init__(
            f"Method {request.method.decode()} is not allowed on {request.path.decode('latin-1')}.",
            headers={"Allow": allowed},
        )
