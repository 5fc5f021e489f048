"""The admin API's guard (`/admin/v1/...`: jobs, keys): the admin token, never a client key
or the registration token; with no token set, loopback clients only."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

from fastapi import Request

from vpool.auth import BearerKeys
from vpool.config import ControllerSettings
from vpool.errors import PermissionDenied


def admin_guard(settings: ControllerSettings) -> Callable[[Request], Awaitable[None]]:
    keys = BearerKeys([settings.admin_token] if settings.admin_token else [])

    async def require_admin(request: Request) -> None:
        if keys.enabled:
            keys.check(request.headers.get("authorization"))
            return
        host = request.client.host if request.client else ""
        if not _is_loopback(host):
            raise PermissionDenied(
                "The admin API answers only loopback clients while no admin token is set "
                "(controller.admin_token, VPOOL_ADMIN_TOKEN)."
            )

    return require_admin


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
