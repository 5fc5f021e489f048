"""Run vpool's servers, several in one event loop, stopped by one signal.

The controller is an ASGI app under uvicorn; the gateway serves itself (`GatewayServer`).
Both have the same shape: `serve()`, `started`, `should_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine, Generator
from typing import Any, Protocol, TypeVar

import uvicorn

T = TypeVar("T")


class Server(Protocol):
    started: bool
    should_exit: bool

    async def serve(self, sockets: Any = None) -> None: ...


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its caller (several share a loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(app: Any, host: str, port: int, graceful_s: float = 30.0) -> Server:
    """A vpool `Gateway` serves itself; any other app (the controller) runs under uvicorn."""
    from vpool.gateway.app import Gateway
    from vpool.gateway.server import GatewayServer

    if isinstance(app, Gateway):
        return GatewayServer(app, host, port, graceful_s=graceful_s)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        loop="auto",
        http="auto",
        timeout_graceful_shutdown=int(graceful_s),
        timeout_keep_alive=30,
    )
    return QuietServer(config)


async def start_server(server: Server) -> asyncio.Task[None]:
    """Start serving; raise at once if the port cannot be bound."""
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            raise SystemExit("could not start a server: its port may be taken")
        await asyncio.sleep(0.02)
    return task


def stop_event_on_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def stop_servers(*servers: tuple[Server, asyncio.Task[None]]) -> None:
    for server, _ in servers:
        server.should_exit = True
    for _, task in servers:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve_until_signal(server: Server) -> None:
    """Serve one server alone until SIGINT/SIGTERM, then stop it gracefully."""
    stop = stop_event_on_signals()
    running = await start_server(server)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await stop_servers((server, running))


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the program's event loop, on uvloop where it is installed (it is with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
