"""The controller's usage API (what `vpool usage` talks to): what each key used, billable.

    GET /admin/v1/usage?key_id=&model=&since=&until=&by=hour|day

Counts per key, model and hour (or day, UTC) as the gateways wrote them to the key store:
requests, prompt and completion tokens, errors. Times are seconds since the epoch; `until`
is exclusive. Guarded like the keys API; the store away: 503.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from vpool.config import ControllerSettings
from vpool.controller.admin_auth import admin_guard
from vpool.controller.keys_api import KeyStoreDown
from vpool.errors import InvalidRequest
from vpool.registry.keys import OPEN_KEY_ID, KeyStore
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.usage import Granularity, UsageQuery

OPEN_KEY_NAME = "(no key)"  # requests to a gateway that needed none


class UsageEntry(BaseModel):
    start: int = Field(description="the hour's (or day's) start, seconds since the epoch, UTC")
    key_id: str
    key_name: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    errors: int


class UsageList(BaseModel):
    object: str = "list"
    by: Granularity
    data: list[UsageEntry]


def usage_router(settings: ControllerSettings, store: KeyStore) -> APIRouter:
    router = APIRouter(
        prefix="/admin/v1/usage", dependencies=[Depends(admin_guard(settings))], tags=["usage"]
    )

    @router.get("")
    async def usage(
        key_id: str | None = None,
        model: str | None = None,
        since: float | None = Query(None, allow_inf_nan=False),
        until: float | None = Query(None, allow_inf_nan=False),
        by: Granularity = "hour",
    ) -> UsageList:
        if since is not None and until is not None and since >= until:
            raise InvalidRequest("`since` must be before `until`.", param="since")
        query = UsageQuery(since=since, until=until, key_id=key_id, model=model, by=by)
        try:
            rows = await store.usage(query)
            names = {k.key_id: k.name for k in await store.list()}
        except RegistryUnavailable as exc:
            raise KeyStoreDown(f"The key store is unavailable: {exc}") from exc
        names[OPEN_KEY_ID] = OPEN_KEY_NAME
        return UsageList(
            by=by,
            data=[
                UsageEntry(
                    **row.model_dump(),
                    key_name=names.get(row.key_id, row.key_id),
                    total_tokens=row.total_tokens,
                )
                for row in rows
            ],
        )

    return router
