"""The controller's admin API for API keys (what `vpool keys ...` talks to).

    POST   /admin/v1/keys        make a key: its secret is in this answer and nowhere else
    GET    /admin/v1/keys        every key (never a secret, nor its digest)
    GET    /admin/v1/keys/{id}   one key
    PATCH  /admin/v1/keys/{id}   change its name, models, limits, priority, expiry, meta
    DELETE /admin/v1/keys/{id}   revoke it: every gateway refuses it within a second

Guarded like the jobs API (vpool/controller/admin_auth.py). The store away: 503, nothing half
made.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from vpool.config import ControllerSettings
from vpool.controller.admin_auth import admin_guard
from vpool.errors import InvalidRequest, NotFound, ServiceUnavailable
from vpool.registry.keys import ApiKey, KeyStore, new_secret, with_secret
from vpool.registry.protocol import RegistryUnavailable

T = TypeVar("T")


class KeyFields(BaseModel):
    """What a key may do: given when it is made, each changeable later."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    models: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)  # null: every model
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_parallel: int | None = Field(None, gt=0)
    priority: int | None = Field(None, ge=1)
    expires_at: float | None = Field(None, allow_inf_nan=False)  # seconds since the epoch
    meta: dict[str, str] | None = None


class KeyCreate(KeyFields):
    name: str = Field(min_length=1, max_length=200)


class PublicKey(BaseModel):
    key_id: str
    name: str
    prefix: str
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    priority: int
    expires_at: float | None
    meta: dict[str, str]
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


class CreatedKey(BaseModel):
    key: PublicKey
    secret: str  # shown once


class KeyList(BaseModel):
    object: str = "list"
    data: list[PublicKey]


class KeyStoreDown(ServiceUnavailable):
    default_code = "key_store_unavailable"


class KeyNotFound(NotFound):
    default_code = "key_not_found"

    def __init__(self, key_id: str) -> None:
        super().__init__(f"No API key with id '{key_id}'.", param="key_id")


def keys_router(settings: ControllerSettings, store: KeyStore) -> APIRouter:
    router = APIRouter(prefix="/admin/v1/keys", dependencies=[Depends(admin_guard(settings))], tags=["keys"])

    async def call(operation: Awaitable[T]) -> T:
        try:
            return await operation
        except RegistryUnavailable as exc:
            raise KeyStoreDown(f"The key store is unavailable: {exc}") from exc

    async def existing(key_id: str) -> ApiKey:
        key = await call(store.get(key_id))
        if key is None:
            raise KeyNotFound(key_id)
        return key

    @router.post("", status_code=201)
    async def create(body: KeyCreate) -> CreatedKey:
        _check_expiry(body.expires_at)
        secret = new_secret()
        key = with_secret(ApiKey(**_given(body)), secret)
        await call(store.put(key))
        return CreatedKey(key=_public(key), secret=secret)

    @router.get("")
    async def list_keys() -> KeyList:
        keys = await call(store.list())
        return KeyList(data=[_public(k) for k in keys])

    @router.get("/{key_id}")
    async def show(key_id: str) -> PublicKey:
        return _public(await existing(key_id))

    @router.patch("/{key_id}")
    async def update(key_id: str, body: KeyFields) -> PublicKey:
        if "expires_at" in body.model_fields_set:
            _check_expiry(body.expires_at)
        key = await existing(key_id)
        if key.revoked_at is not None:
            raise InvalidRequest(f"API key '{key_id}' is revoked: make a new one.", code="key_revoked")
        changed = key.model_copy(update=_given(body, partial=True))
        ApiKey.model_validate(changed.model_dump())  # the limits' bounds, as on creation
        await call(store.put(changed))
        return _public(changed)

    @router.delete("/{key_id}")
    async def revoke(key_id: str) -> PublicKey:
        key = await existing(key_id)
        if key.revoked_at is None:
            key.revoked_at = time.time()
            await call(store.put(key))
        return _public(key)

    return router


def _given(body: KeyFields, partial: bool = False) -> dict[str, Any]:
    """The fields the request set (for an update, null where it cleared one)."""
    fields = body.model_dump(exclude_unset=True)
    if not partial:
        return {k: v for k, v in fields.items() if v is not None}
    for name in ("name", "priority", "meta"):  # these cannot be cleared
        if name in fields and fields[name] is None:
            raise InvalidRequest(f"`{name}` cannot be null.", param=name)
    return fields


def _check_expiry(expires_at: float | None) -> None:
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequest("`expires_at` is in the past.", param="expires_at")


def _public(key: ApiKey) -> PublicKey:
    return PublicKey.model_validate(key.public())
