"""What every request of one gateway shares, built in the app's lifespan (no globals).

The fleet view and its refresh loop (which also announces this gateway for discovery), the
upstream pool, the proxy and its timeout sweep, the metrics, the keys, their limits, the
usage meter and the fair-share queues (let out after each refresh of the fleet).
`create_app` makes one per app start; tests and `vpool up` reach it as `app.state.gateway`.
"""

from __future__ import annotations

import asyncio

from vpool.background import cancel_and_wait
from vpool.config import Settings
from vpool.gateway.announce import Announcer, advertised_url
from vpool.gateway.ejection import Ejector
from vpool.gateway.fair_share import FairShare
from vpool.gateway.fleet import Fleet
from vpool.gateway.limits import RateLimiter
from vpool.gateway.metering import Accounts, UsageMeter
from vpool.gateway.metrics import GatewayMetrics
from vpool.gateway.proxy import Proxy, resolve_timeouts
from vpool.gateway.routing import RoutingPolicy, make_policy, model_policies
from vpool.gateway.tenants import KeyRing
from vpool.gateway.upstream import UpstreamPool
from vpool.registry.key_stores import config_keys, open_key_store
from vpool.registry.keys import KeyStore
from vpool.registry.protocol import Registry
from vpool.registry.records import WorkerRecord
from vpool.registry.redis_client import redis_client


class GatewayState:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        policy: RoutingPolicy | None = None,
        key_store: KeyStore | None = None,
    ) -> None:
        g = settings.gateway
        self.settings = settings
        self.registry = registry
        self._owns_key_store = key_store is None
        self.key_store = key_store or open_key_store(settings)
        self.keys = KeyRing(
            config_keys(g), self.key_store, g.keys_refresh_interval_s, g.max_failed_auth_per_minute
        )
        self.max_body_bytes = g.max_body_bytes
        self.fleet = Fleet(
            registry,
            policy or make_policy(g.routing, g.prefix_routing),
            settings.catalog_names(),
            g.refresh_interval_s,
            # The workers' TTL, as the controller sets it: give gateways the same `controller:`.
            expiry_window_s=settings.controller.worker_ttl_s,
            ejector=Ejector(g.eject_after_failures, g.eject_cooldown_s, g.eject_max_cooldown_s),
            heartbeat_interval_s=settings.controller.heartbeat_interval_s,
            model_policies=model_policies(settings),
        )
        if (url := advertised_url(g)) is not None:
            self.fleet.announcer = Announcer(registry, url)
        self.metrics = GatewayMetrics()
        self.pool = UpstreamPool(g.connect_timeout_s)
        timeouts, model_timeouts = resolve_timeouts(settings)
        self.proxy = Proxy(
            self.pool, self.fleet, self.metrics, g.max_attempts, timeouts, model_timeouts, g.retry_backoff_s
        )
        r = settings.registry
        shared = None if r.url.startswith("memory://") else redis_client(r.url, g.limits_timeout_s)
        self.limiter = RateLimiter(shared, r.key_prefix, g.limits_timeout_s)
        self.meter = UsageMeter(self.key_store, self.metrics)
        self.fair_share = FairShare(self.fleet, g.fair_share)
        # Capacity changes with a refresh (a worker joined, others' load fell): waiting
        # requests go out then, not at a timer of their own.
        self.fleet.after_refresh = self.fair_share.pump_all
        self.accounts = Accounts(self.limiter, self.meter, self.fleet, g.default_max_tokens_estimate)
        self._background: list[asyncio.Task[None]] = []
        # Built in the lifespan, so on the loop that serves: requests use it without a lookup.
        self.loop = asyncio.get_running_loop()

    async def start(self) -> None:
        await self.fleet.refresh()
        await self.fleet.announce()
        await self.keys.refresh()
        self._background = [
            asyncio.create_task(self.keys.run(), name="keys-refresh"),
            asyncio.create_task(self.limiter.run(), name="limits-beat"),
            asyncio.create_task(self.meter.run(), name="usage-flush"),
            asyncio.create_task(self.fleet.run(), name="fleet-refresh"),
            asyncio.create_task(self.proxy.watch_timeouts(), name="timeout-sweep"),
        ]

    async def close(self) -> None:
        for task in self._background:
            await cancel_and_wait(task)
        if self.fleet.announcer is not None:
            await self.fleet.announcer.withdraw()
        await self.keys.refresh()  # the last uses
        await self.meter.flush()
        await self.limiter.close()
        if self._owns_key_store:
            await self.key_store.close()
        self.pool.close()

    async def holder_of(self, response_id: str, model: str | None = None) -> WorkerRecord | None:
        """The worker storing `response_id` among those that could have made it: the ready
        workers of `model`, or of any generating model when the model is not known."""
        candidates = self.fleet.ready_for(model) if model is not None else self.fleet.ready_generators()
        if not candidates:
            return None
        return await self.proxy.response_owners.locate(response_id, candidates, self.proxy.origin)
