"""Controllers on real sockets for the unit tests, over a memory registry by default.

The fixtures built on these (`start_controller`, `shared_controller`, `controller`) live in
conftest.py, so that every test module gets the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.support.stub_worker import RunningServer
from vpool.config import ControllerSettings, EndpointSpec
from vpool.controller.app import create_controller_app
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.protocol import Registry

if TYPE_CHECKING:
    from tests.unit.conftest import Servers

TOKEN = "controller-token"
HEARTBEAT_S = 0.2


@dataclass
class ControllerHandle:
    url: str
    settings: ControllerSettings
    server: RunningServer
    registry: Registry

    def clear(self) -> None:
        """Empty the registry: no workers, no announced gateways."""

        async def remove_all() -> None:
            for record in await self.registry.list_workers():
                await self.registry.remove(record.worker_id)
            for gateway in await self.registry.list_gateways():
                await self.registry.withdraw_gateway(gateway.url)

        self.server.call(remove_all())


ControllerFactory = Callable[..., ControllerHandle]


def start_on(
    servers: Servers,
    *,
    token: str | None = None,
    endpoints: list[EndpointSpec] | None = None,
    registry: Registry | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> ControllerHandle:
    settings = ControllerSettings(
        registration_token=token,
        heartbeat_interval_s=heartbeat_s,
        expiry_intervals=3,
        health_probe_timeout_s=0.5,
    )
    registry = registry or MemoryRegistry()
    server = servers.serve(create_controller_app(settings, registry, endpoints))
    return ControllerHandle(server.url, settings, server, registry)
