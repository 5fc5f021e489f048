"""Answer 503 once the engine has died, so gateways retry elsewhere instead of relaying 500s.

When vLLM's engine-core process dies (killed, out of memory, a crashed kernel), vLLM
answers every request with a 500 that names no cause a client can act on. The worker is
about to leave the pool (see `server.run_worker`); until it has, this guard turns those
answers into a 503 `engine_unavailable`, which a gateway retries on another replica
before the client has seen a byte. Streams already under way end with vLLM's error event.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vpool.errors import EngineUnavailable
from vpool.http_errors import error_response


class DeadEngineGuard:
    """ASGI middleware over vLLM's app."""

    def __init__(self, app: ASGIApp, engine_dead: Callable[[], bool]) -> None:
        self.app = app
        self.engine_dead = engine_dead

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.engine_dead():
            await error_response(EngineUnavailable())(scope, receive, send)
            return
        replaced = False

        async def send_or_replace(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start":
                # A 500 born of the engine's death, before any byte reached the client.
                replaced = message["status"] == 500 and self.engine_dead()
                if replaced:
                    await error_response(EngineUnavailable())(scope, receive, send)
                    return
            if not replaced:
                await send(message)

        await self.app(scope, receive, send_or_replace)
