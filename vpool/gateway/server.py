"""The gateway app on uvicorn, with the gateway's HTTP protocol and its limits."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

from vpool.config import GatewaySettings
from vpool.gateway.http_protocol import ProtocolLimits, make_protocol
from vpool.serving import make_server


def gateway_server(
    app: FastAPI, settings: GatewaySettings, host: str | None = None, port: int | None = None
) -> uvicorn.Server:
    """A uvicorn server for a gateway app (`create_app`); host and port default to the settings'."""
    limits = ProtocolLimits(read_timeout_s=settings.request_read_timeout_s)
    return make_server(
        app,
        settings.host if host is None else host,
        settings.port if port is None else port,
        graceful_s=settings.graceful_shutdown_s,
        http=make_protocol(limits),
    )
