"""Several gateway processes on one port (SO_REUSEPORT), for more cores and more sockets.

Each process is a whole gateway with its own fleet view, read from the shared registry:
only split mode (Redis) can run more than one. The kernel spreads new connections over
them. It also lifts the per-process open-file cap: every proxied stream holds two sockets,
so 10,000 open streams need more descriptors than one process may have on many hosts.
"""

from __future__ import annotations

import multiprocessing
import signal
from types import FrameType

from vpool.config import Settings
from vpool.gateway.app import create_app
from vpool.gateway.server import gateway_server
from vpool.logs import setup_logging
from vpool.registry.protocol import open_registry
from vpool.serving import bind_socket, raise_open_file_limit, run, serve_until_signal


def serve_gateway(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM in `settings.gateway.processes` processes; the exit code."""
    count = settings.gateway.processes
    if count == 1:
        run(_serve_one(settings, reuse_port=False))
        return 0
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=_child, args=(settings,), name=f"vpool-gateway-{i}", daemon=False)
        for i in range(count)
    ]
    for child in children:
        child.start()

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in children:
            if child.is_alive() and child.pid is not None:
                child.terminate()  # SIGTERM: each drains its open answers, then exits

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        child.join()
    return max(abs(child.exitcode or 0) for child in children)


def _child(settings: Settings) -> None:
    setup_logging()  # a spawned process starts with none
    run(_serve_one(settings, reuse_port=True))


async def _serve_one(settings: Settings, reuse_port: bool) -> None:
    raise_open_file_limit()
    g = settings.gateway
    sock = bind_socket(g.host, g.port, reuse_port=reuse_port)
    registry = open_registry(settings.registry)
    try:
        await serve_until_signal(gateway_server(create_app(settings, registry), g), [sock])
    finally:
        sock.close()
        await registry.close()
