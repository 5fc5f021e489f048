"""This gateway's announcement in the registry, so that discovery (the controller's
`/v1/targets`, which Prometheus reads) finds every gateway without anyone listing hosts.

The fleet's background refresh calls `tick` after each refresh that reached the registry; it
writes at most once per `interval_s`, alive for `TTL_INTERVALS` intervals, so a gateway that
dies leaves the targets within about 15 s and a running one costs the registry one small
write every 5 s. Never on the request path. On a clean stop the announcement is withdrawn.
"""

from __future__ import annotations

import logging
import socket
import time

from vpool.config import GatewaySettings
from vpool.registry.protocol import Registry, RegistryUnavailable

log = logging.getLogger("vpool.gateway")

ANNOUNCE_INTERVAL_S = 5.0
TTL_INTERVALS = 3  # announcements one may miss (a slow Redis, a long refresh) and stay listed


def advertised_url(settings: GatewaySettings) -> str | None:
    """`gateway.advertise_url`, else http://HOST:PORT with this host's name for a wildcard
    bind; None for port 0 (the port is not known until bound, so nothing is announced)."""
    if settings.advertise_url:
        return settings.advertise_url.rstrip("/")
    if settings.port == 0:
        return None
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


class Announcer:
    def __init__(self, registry: Registry, url: str, interval_s: float = ANNOUNCE_INTERVAL_S) -> None:
        self.url = url
        self._registry = registry
        self._interval = interval_s
        self._due = 0.0  # monotonic

    @property
    def ttl_s(self) -> float:
        return self._interval * TTL_INTERVALS

    async def tick(self) -> None:
        """Announce if one is due. A failure is retried on the next tick: the fleet's refresh
        already reports the registry's outages."""
        now = time.monotonic()
        if now < self._due:
            return
        try:
            await self._registry.announce_gateway(self.url, self.ttl_s)
        except RegistryUnavailable:
            return
        self._due = now + self._interval

    async def withdraw(self) -> None:
        """Leave the targets now; with the registry away, the TTL removes us instead."""
        try:
            await self._registry.withdraw_gateway(self.url)
        except RegistryUnavailable as exc:
            log.info("could not withdraw this gateway's announcement (its TTL will): %s", exc)
