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


async def served_max_model_len(http: httpx.AsyncClient, url: str, names: list[str]) -> int | None:
    """The context length an OpenAI-compatible server reports for one of `names` in
    `/v1/models` (vLLM and SGLang give `max_model_len`); for its only model if it serves
    one under another name. None when it does not say."""
    try:
        resp = await http.get(f"{url}/v1/models")
        models = resp.json().get("data", []) if resp.is_success else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not isinstance(models, list):
        return None
    cards = [m for m in models if isinstance(m, dict)]
    named = [m for m in cards if m.get("id") in names] or (cards if len(cards) == 1 else [])
    lengths = [m.get("max_model_len") for m in named]
    valid = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(valid) if valid else None
