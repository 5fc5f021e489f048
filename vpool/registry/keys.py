"""API keys as data: the record, how a secret is made and hashed, and the store's interface.

A secret is shown once, when made; the store keeps only its SHA-256 digest (the secrets are
192 random bits, so a fast hash is enough: there is nothing to guess from a digest), its
first characters for people to recognise it by, and what the key may do. Two stores
implement `KeyStore`: Redis for a split fleet (every gateway reads it), SQLite for `vpool up`.
Both keep a version number that every change increments, so a gateway polls one number
and re-reads the keys only when it moved.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
import time
import uuid
from typing import Protocol

from pydantic import BaseModel, Field

from vpool.registry.usage import UsageBatch, UsageQuery, UsageRow

SECRET_PREFIX = "vp-"
SHOWN_CHARS = 8  # of the secret after its prefix, kept to recognise it by
# What requests to a gateway that needs no key count under, in usage and fair-share queues.
OPEN_KEY_ID = "-"


class ApiKey(BaseModel):
    """What a key may do and when it was used; never its secret."""

    key_id: str = Field(default_factory=lambda: f"key_{uuid.uuid4().hex[:16]}")
    name: str
    prefix: str = ""  # "vp-AbCd1234": enough to recognise, useless to authenticate
    secret_hash: str = ""
    models: list[str] | None = None  # None: every model
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_parallel: int | None = Field(None, gt=0)
    priority: int = Field(1, ge=1)
    expires_at: float | None = None
    meta: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)
    last_used_at: float | None = None
    revoked_at: float | None = None

    def usable_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self) -> dict[str, object]:
        """The record as the admin API shows it: no digest either."""
        return self.model_dump(exclude={"secret_hash"})


def key_id_of(key: ApiKey | None) -> str:
    """The key's id, or OPEN_KEY_ID for a request made without one."""
    return key.key_id if key is not None else OPEN_KEY_ID


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(24)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def with_secret(key: ApiKey, secret: str) -> ApiKey:
    """`key` bound to `secret`: its digest and its recognisable prefix."""
    shown = secret[: len(SECRET_PREFIX) + SHOWN_CHARS]
    return key.model_copy(update={"secret_hash": hash_secret(secret), "prefix": shown})


class KeyStore(Protocol):
    """Durable keys and their usage. Every method raises `RegistryUnavailable` when the store
    cannot answer."""

    async def put(self, key: ApiKey) -> None:
        """Create or replace `key` and move the version on."""
        ...

    async def get(self, key_id: str) -> ApiKey | None: ...

    async def list(self) -> list[ApiKey]: ...

    async def version(self) -> int:
        """A number that every change to the keys increments."""
        ...

    async def touch(self, last_used: dict[str, float]) -> None:
        """Record when keys were last used (batched; not a change of version)."""
        ...

    async def add_usage(self, batch: UsageBatch) -> None:
        """Add a gateway's counts per key, model and hour (vpool/registry/usage.py)."""
        ...

    async def usage(self, query: UsageQuery) -> builtins.list[UsageRow]: ...

    async def close(self) -> None: ...
