"""`vpool controller`: the registry API, static endpoints, and the config's local workers."""

from __future__ import annotations

import asyncio

from vpool.background import cancel_and_wait
from vpool.config import Settings
from vpool.controller.app import create_controller_app
from vpool.controller.launcher import LocalLauncher
from vpool.registry.key_stores import open_key_store
from vpool.registry.protocol import open_registry
from vpool.serving import make_server, start_server, stop_event_on_signals, stop_servers


async def run_controller(settings: Settings, launch: bool = True) -> int:
    """Serve until SIGINT/SIGTERM; local workers are drained on the way out."""
    c = settings.controller
    registry = open_registry(settings.registry)
    keys = open_key_store(settings)
    server = make_server(create_controller_app(c, registry, settings.endpoints, keys), c.host, c.port)
    stop = stop_event_on_signals()
    serving = await start_server(server)
    print(
        f"vpool controller on http://{c.host}:{c.port} (registry {settings.registry.url})",
        flush=True,
    )
    if not c.admin_token:
        print("No admin token (VPOOL_ADMIN_TOKEN): the admin API answers loopback only.", flush=True)
    launcher: LocalLauncher | None = None
    supervisor: asyncio.Task[None] | None = None
    if launch and settings.models:
        host = "127.0.0.1" if c.host in ("0.0.0.0", "::") else c.host
        launcher = LocalLauncher(
            settings.models,
            f"http://{host}:{c.port}",
            registry,
            settings.cache_dir,
            c.registration_token,
        )
        launcher.start_all()
        supervisor = asyncio.create_task(launcher.supervise())
    try:
        await stop.wait()
    finally:
        if supervisor is not None:
            await cancel_and_wait(supervisor)
        if launcher is not None:
            await launcher.stop_all()
        await stop_servers((server, serving))
        await registry.close()
        await keys.close()
    return 0
