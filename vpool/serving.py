"""Run vpool's ASGI apps under uvicorn, several in one event loop, stopped by one signal.

Every server is a uvicorn server (`make_server`); callers choose its HTTP protocol (the
gateway passes its own, vpool/gateway/http_protocol.py). `vpool up` runs the controller
and the gateway side by side in one loop, so signals are handled here, once, not by each.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

import uvicorn

T = TypeVar("T")


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its caller (several share a loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(
    app: Any,
    host: str,
    port: int,
    graceful_s: float = 30.0,
    *,
    http: Any = "auto",
    keep_alive_s: float = 30.0,
) -> QuietServer:
    """A uvicorn server for `app`; `http` is uvicorn's protocol choice or a protocol class."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        loop="auto",
        http=http,
        ws="none",  # no route of vpool's is a WebSocket; `Upgrade:` is declined, never taken
        lifespan="on",
        server_header=False,
        proxy_headers=False,  # nothing of vpool reads the client address; a layer per request saved
        backlog=4096,
        timeout_graceful_shutdown=max(1, round(graceful_s)),
        timeout_keep_alive=max(1, round(keep_alive_s)),
    )
    return QuietServer(config)


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A listening-ready socket; with `reuse_port` several processes may bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def start_server(
    server: uvicorn.Server, sockets: list[socket.socket] | None = None
) -> asyncio.Task[None]:
    """Start serving; raise at once if the port cannot be bound or the app fails to start."""
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started:
        if task.done():
            await task
            raise SystemExit("could not start a server: its port may be taken, or its app failed to start")
        await asyncio.sleep(0.02)
    return task


def stop_event_on_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def stop_servers(*servers: tuple[uvicorn.Server, asyncio.Task[None]]) -> None:
    for server, _ in servers:
        server.should_exit = True
    for _, task in servers:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve_until_signal(server: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
    """Serve one server alone until SIGINT/SIGTERM, then stop it gracefully."""
    stop = stop_event_on_signals()
    running = await start_server(server, sockets)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await stop_servers((server, running))


def raise_open_file_limit(wanted: int = 1 << 20) -> None:
    """Each proxied request holds two sockets: lift the soft limit (often 1024) as far as allowed.

    A privileged process may raise the hard limit too (up to the kernel's `fs.nr_open`).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (wanted, hard):
        if target == resource.RLIM_INFINITY or target <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
            return
        except (ValueError, OSError):
            continue


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the program's event loop, on uvloop where it is installed (it is with uvicorn[standard])."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
