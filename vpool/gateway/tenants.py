"""Who may call the gateway, and which models: the config file's keys and the key store's.

A request costs one SHA-256 of the presented secret and one dict lookup: the store is read
into memory and read again only when its version moves (polled every `refresh_s`, so a key
made, revoked or expired anywhere takes effect here within about that). The store away:
the keys last read keep working, and `store_ok` says so for `/health`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from vpool.errors import AuthenticationFailed, ModelNotFound
from vpool.gateway.auth_throttle import AuthThrottle
from vpool.registry.keys import ApiKey, KeyStore, hash_secret
from vpool.registry.protocol import RegistryUnavailable

log = logging.getLogger("vpool.gateway")


class KeyRing:
    def __init__(
        self,
        static: Iterable[ApiKey],
        store: KeyStore | None = None,
        refresh_s: float = 0.5,
        max_failed_auth_per_minute: int = 20,
    ) -> None:
        self._static = {k.secret_hash: k for k in static}
        self._store = store
        self._refresh_s = refresh_s
        self._by_hash: dict[str, ApiKey] = dict(self._static)
        self._version = -1
        self._used: dict[str, float] = {}
        self.store_ok = True
        self.throttle = AuthThrottle(max_failed_auth_per_minute) if max_failed_auth_per_minute else None

    @property
    def enabled(self) -> bool:
        """Is a key needed at all? Not while none exists anywhere (a laptop's default)."""
        return bool(self._by_hash)

    def check(self, authorization: str | None, address: str = "") -> ApiKey | None:
        """The caller's key; AuthenticationFailed unless it is known and usable (429 instead,
        for an address that keeps failing). None when no key is needed."""
        if not self._by_hash:
            return None
        try:
            return self._check(authorization)
        except AuthenticationFailed:
            # A refused address still gets in with a right key: clients behind one load
            # balancer share its address, and one guesser must not lock them all out.
            if self.throttle is not None:
                self.throttle.check(address)
                self.throttle.failed(address)
            raise

    def _check(self, authorization: str | None) -> ApiKey | None:
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as `Authorization: Bearer YOUR_KEY`."
            )
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise AuthenticationFailed("Malformed Authorization header: use `Bearer YOUR_KEY`.")
        key = self._by_hash.get(hash_secret(secret))
        if key is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        now = time.time()
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="key_revoked")
        if key.expires_at is not None and now >= key.expires_at:
            raise AuthenticationFailed("This API key has expired.", code="key_expired")
        self._used[key.key_id] = now
        return key

    @staticmethod
    def require_model(key: ApiKey | None, model: str) -> None:
        """A model the key may not use does not exist for it (as OpenAI answers)."""
        if key is not None and not key.allows(model):
            raise ModelNotFound(model)

    async def refresh(self) -> None:
        """Read the store again if it changed; on failure keep what was read last."""
        if self._store is None:
            return
        try:
            version = await self._store.version()
            if version != self._version:
                keys = await self._store.list()
                self._by_hash = {**{k.secret_hash: k for k in keys}, **self._static}
                self._version = version
            used, self._used = self._used, {}
            stored = {k: t for k, t in used.items() if not k.startswith("config-")}
            try:
                await self._store.touch(stored)
            except RegistryUnavailable:
                self._used = {**used, **self._used}  # tried again next time
                raise
        except RegistryUnavailable as exc:
            if self.store_ok:
                log.warning("key store unavailable, serving the keys last read: %s", exc)
            self.store_ok = False
            return
        if not self.store_ok:
            log.info("key store available again")
        self.store_ok = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
