"""Serve a `Gateway` on a socket: accept, keep-alive expiry, graceful stop.

It has the shape `vpool.serving` expects of a server (`serve`, `started`, `should_exit`),
so the gateway runs beside the controller's uvicorn in one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket

from vpool.gateway.app import Gateway
from vpool.gateway.http1 import ClientConnection

log = logging.getLogger("vpool.gateway")

TICK_S = 0.1
EXPIRE_EVERY_TICKS = 10


class GatewayServer:
    def __init__(
        self,
        gateway: Gateway,
        host: str,
        port: int,
        graceful_s: float = 30.0,
        keep_alive_s: float = 30.0,
        reuse_port: bool = False,
    ) -> None:
        self.gateway = gateway
        self.host = host
        self.port = port
        self.graceful_s = graceful_s
        self.keep_alive_s = keep_alive_s
        self.reuse_port = reuse_port
        self.started = False
        self.should_exit = False
        self.connections: set[ClientConnection] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until `should_exit`, then finish open answers within the grace period."""
        gateway = self.gateway
        raise_open_file_limit()
        await gateway.start()
        loop = asyncio.get_running_loop()

        def protocol() -> ClientConnection:
            return ClientConnection(gateway.handle, gateway.limits, self.connections)

        if sockets:
            servers = [await loop.create_server(protocol, sock=s, backlog=4096) for s in sockets]
        else:
            servers = [
                await loop.create_server(
                    protocol, self.host, self.port, backlog=4096, reuse_port=self.reuse_port or None
                )
            ]
        self.started = True
        ticks = 0
        try:
            while not self.should_exit:
                await asyncio.sleep(TICK_S)
                ticks += 1
                if ticks % EXPIRE_EVERY_TICKS == 0:
                    self._expire_idle(loop.time())
        finally:
            for server in servers:
                server.close()
            log.info("stopping: no new connections; %d open", len(self.connections))
            started = loop.time()
            await self._drain(loop)
            await gateway.close()
            log.info("stopped after %.1f s", loop.time() - started)

    def _expire_idle(self, now: float) -> None:
        """Close idle keep-alive connections, and those dripping a request too slowly."""
        for conn in list(self.connections):
            if conn.idle and now - conn.last_active > self.keep_alive_s:
                conn.close()
            else:
                conn.expire_slow_request(now)

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop taking requests, let open answers (streams too) end, then close the rest."""
        deadline = loop.time() + self.graceful_s
        while True:
            for conn in [c for c in self.connections if c.idle]:
                conn.close()
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning(
                "closing %d connections still busy after %.0f s", len(self.connections), self.graceful_s
            )
            for conn in list(self.connections):
                conn.abort()


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
