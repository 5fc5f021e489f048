"""The worker's guard turns a dead engine's 500s into retryable 503s, and nothing else."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from vpool.worker.engine_guard import DeadEngineGuard


class Engine:
    """Stands in for vLLM's app: answers `status`, or dies while it handles the request."""

    def __init__(self) -> None:
        self.dead = False
        self.dies_during_request = False
        self.calls = 0

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        if self.dies_during_request:
            self.dead = True
        status = 500 if self.dead else 200
        body = b'{"error":{"message":"EngineCore encountered an issue."}}' if self.dead else b'{"ok":true}'
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body})


def _client(engine: Engine) -> httpx.AsyncClient:
    guard = DeadEngineGuard(engine.app, lambda: engine.dead)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://worker")


async def test_a_live_engine_answers_untouched() -> None:
    engine = Engine()
    async with _client(engine) as client:
        resp = await client.post("/v1/chat/completions", json={})
    assert resp.status_code == 200
    assert resp.json() == {"ok": True}


@pytest.mark.parametrize("dies_during_request", [False, True], ids=["already-dead", "dies-in-flight"])
async def test_a_dead_engine_answers_503_engine_unavailable(dies_during_request: bool) -> None:
    engine = Engine()
    engine.dead = not dies_during_request
    engine.dies_during_request = dies_during_request
    async with _client(engine) as client:
        resp = await client.post("/v1/chat/completions", json={})
    assert resp.status_code == 503
    assert resp.headers["retry-after"] == "1"
    error = resp.json()["error"]
    assert error["code"] == "engine_unavailable"
    assert error["type"] == "service_unavailable"
    assert engine.calls == (1 if dies_during_request else 0)  # a dead engine is not even asked


async def test_a_500_from_a_live_engine_is_not_hidden() -> None:
    async def failing_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"boom"})

    guard = DeadEngineGuard(failing_app, lambda: False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://w") as client:
        resp = await client.get("/v1/models")
    assert resp.status_code == 500
    assert resp.text == "boom"
