"""`vpool up`: controller, gateway and local workers in one command.

Controller and gateway run in this process over one registry (in memory unless the config
names Redis); each model replica is a child process registered with the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import uvicorn
from rich.console import Console
from rich.live import Live

from vpool.background import cancel_and_wait
from vpool.config import ModelSpec, Settings
from vpool.console import progress_table, ready_panel
from vpool.controller.app import create_controller_app
from vpool.controller.launcher import LocalLauncher
from vpool.gateway.app import create_app
from vpool.gateway.server import gateway_server
from vpool.registry.key_stores import open_key_store
from vpool.registry.protocol import open_registry
from vpool.registry.records import WorkerState
from vpool.serving import (
    make_server,
    raise_open_file_limit,
    start_server,
    stop_event_on_signals,
    stop_servers,
)

log = logging.getLogger("vpool")

DEFAULT_CATALOG = [
    ModelSpec(
        name="tiny-chat",
        model="builtin:tiny-chat",
        max_model_len=2048,
        # A fixed KV cache: on CPU a memory fraction is of the whole host, and vLLM refuses
        # to start when that fraction is below what the process already uses.
        engine_args={"enforce_eager": True, "kv_cache_memory_bytes": 256 * 1024 * 1024},
    ),
    ModelSpec(
        name="all-MiniLM-L6-v2",
        model="builtin:all-MiniLM-L6-v2",
        runner="pooling",
        dtype="float32",  # its weights are float32; float16 on CPU costs accuracy for nothing
        gpu_memory_utilization=0.1,
        engine_args={"enforce_eager": True},
    ),
]


async def run_up(settings: Settings, console: Console) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit code."""
    registry = open_registry(settings.registry)
    c, g = settings.controller, settings.gateway
    controller_url = f"http://{'127.0.0.1' if c.host in ('0.0.0.0', '::') else c.host}:{c.port}"
    keys = open_key_store(settings)
    controller = make_server(create_controller_app(c, registry, settings.endpoints, keys), c.host, c.port)
    raise_open_file_limit()
    gateway_app = create_app(settings, registry, key_store=keys)
    gateway = gateway_server(gateway_app, g)
    stop = stop_event_on_signals()
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = [(controller, await start_server(controller))]
    servers.append((gateway, await start_server(gateway)))
    if g.processes > 1:
        console.print("[yellow]vpool up runs one gateway process; for more: vpool gateway --processes N.[/]")
    if g.is_open:
        console.print(f"[yellow]No API key configured: the gateway is open, on {g.host} only.[/]")
    if not c.admin_token:
        console.print("[yellow]No admin token (VPOOL_ADMIN_TOKEN): the admin API answers loopback only.[/]")
    launcher = LocalLauncher(
        settings.models, controller_url, registry, settings.cache_dir, c.registration_token
    )
    launcher.start_all()
    code = 0
    try:
        if not await _wait_until_loaded(launcher, stop, console):
            code = 1
        else:
            await gateway_app.state.gateway.fleet.refresh()  # what the panel promises is routable now
            console.print(ready_panel(settings, _ready_models(settings, launcher)))
            supervisor = asyncio.create_task(launcher.supervise())
            await stop.wait()
            await cancel_and_wait(supervisor)
    finally:
        console.print("Stopping: workers drain, then exit…")
        await launcher.stop_all()
        await stop_servers(*servers)
        await registry.close()
        await keys.close()
    return code


async def _wait_until_loaded(launcher: LocalLauncher, stop: asyncio.Event, console: Console) -> bool:
    with Live(progress_table(launcher.workers), console=console, refresh_per_second=2) as live:
        while not stop.is_set():
            await launcher.poll()
            live.update(progress_table(launcher.workers))
            if any(w.state == WorkerState.FAILED for w in launcher.workers):
                break
            if all(w.state == WorkerState.READY for w in launcher.workers):
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
    for w in launcher.workers:
        if w.state == WorkerState.FAILED:
            console.print(
                f"[red]worker {w.worker_id} ({w.spec.model}) failed to start.[/] Its log ({w.log_path}) ends:"
            )
            console.print(w.log_tail(), markup=False, highlight=False)
    return False


def _ready_models(settings: Settings, launcher: LocalLauncher) -> list[tuple[str, str, int]]:
    rows: list[tuple[str, str, int]] = []
    for spec in settings.models:
        ready = sum(1 for w in launcher.workers if w.spec is spec and w.state == WorkerState.READY)
        rows.append((spec.name, spec.runner, ready))
    for ep in settings.endpoints:
        rows.extend((name, "generate", 1) for name in ep.models)
    return rows
