"""Is a server alive? The controller asks before it routes anything to it."""

from __future__ import annotations

import httpx


async def probe_health(http: httpx.AsyncClient, url: str) -> bool:
    """Healthy when `/health` answers 2xx; servers without `/health` may answer `/v1/models`."""
    try:
        resp = await http.get(f"{url}/health")
        if resp.status_code == 404:
            resp = await http.get(f"{url}/v1/models")
    except httpx.HTTPError:
        return False
    return resp.is_success
