"""The data routes: every POST that names a `model`, served as raw ASGI ahead of FastAPI.

A request here costs one pass over its headers, one read of its body, one JSON parse and a
dict lookup: no FastAPI request object, dependency solving or response class. In order:
method → key → body (read once, bounded) → `model` checked → the key's limits charged
(vpool/gateway/metering.py) → its turn, if the model is full (vpool/gateway/fair_share.py)
→ worker chosen → original bytes forwarded → answer relayed
(vpool/gateway/proxy.py, vpool/gateway/responder.py). Anything else goes on to the FastAPI
app this middleware wraps; `/openapi.json` documents these routes all the same
(vpool/gateway/docs.py).

Follow-ups on a stored response (`/v1/responses/{id}` and below it, any method) go to the
worker holding it (vpool/gateway/response_owners.py), as does a new response that names it
as `previous_response_id`.
"""

from __future__ import annotations

import logging

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from vpool.auth import duplicate_authorization
from vpool.errors import InvalidRequest, NotFound, RequestTooLarge, VpoolError, error_body
from vpool.gateway.metering import CLIENT_LEFT, Charge
from vpool.gateway.request_body import OpenAIRequest, parse_openai_request
from vpool.gateway.responder import AsgiResponder, send_whole
from vpool.gateway.state import GatewayState
from vpool.gateway.usage_reading import Usage
from vpool.registry.keys import ApiKey

# Path → the route's label in metrics. Every one is a POST whose body names a `model`.
MODEL_ROUTES: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/tokenize": "tokenize",
    "/detokenize": "detokenize",
    "/pooling": "pooling",
    "/classify": "classify",
    "/score": "score",
    "/v1/score": "score",
    "/rerank": "rerank",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/v2/embed": "embed",
}
# Routes that take no place in an engine's batch, so never wait for a fair share.
UNQUEUED_ROUTES = frozenset({"tokenize", "detokenize", "count_tokens"})
log = logging.getLogger("vpool.gateway")

RESPONSES_PREFIX = "/v1/responses/"
# What a client still sends of a body over the limit is read (and dropped) up to this, so
# it sees the 413 rather than a connection reset.
MAX_DISCARD_BYTES = 16 * 1024 * 1024


class DataRoutes:
    """Pure ASGI middleware: answers the data routes, passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not await serve_data_route(scope, receive, send):
            await self.app(scope, receive, send)


async def serve_data_route(scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer `scope` if it is a data route; False (and nothing sent) if it is not."""
    path: str = scope["path"]
    route = MODEL_ROUTES.get(path)
    if route is not None:
        await _serve(scope["state"]["gateway"], route, scope, receive, send)
        return True
    if path.startswith(RESPONSES_PREFIX):
        await _serve(scope["state"]["gateway"], "responses", scope, receive, send, follow_up=True)
        return True
    return False


async def _serve(
    gateway: GatewayState, route: str, scope: Scope, receive: Receive, send: Send, follow_up: bool = False
) -> None:
    responder = AsgiResponder(send, gateway.loop)
    try:
        await _route(gateway, route, scope, receive, responder, follow_up)
    except VpoolError as exc:
        gateway.metrics.answered(route, "-", exc.status_code, 0.0)
        headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
        await send_whole(send, exc.status_code, exc.json(), headers)
    except Exception:
        # Nothing else renders errors for these routes: no 500 in uvicorn's plain text.
        log.exception("unexpected error answering %s %s", scope["method"], scope["path"])
        if not responder.started:
            body = error_body("The server had an internal error.", "server_error")
            await send_whole(send, 500, orjson.dumps(body))


async def _route(
    gateway: GatewayState,
    route: str,
    scope: Scope,
    receive: Receive,
    responder: AsgiResponder,
    follow_up: bool,
) -> None:
    """Check the request, choose its worker, forward it, relay the answer."""
    if not follow_up and scope["method"] != "POST":
        raise MethodNotAllowed(scope["method"], scope["path"])
    authorization, declared, expects_continue = _read_headers(scope["headers"])
    client = scope.get("client")
    key = gateway.keys.check(authorization, client[0] if client else "")
    body = await _read_body(receive, declared, expects_continue, gateway.max_body_bytes)
    if body is None:
        return  # the client left before sending it all
    holder = None
    if follow_up:
        response_id = scope["path"][len(RESPONSES_PREFIX) :].split("/", 1)[0]
        holder = await gateway.holder_of(response_id) if response_id else None
        if holder is None:
            raise ResponseNotFound(response_id)
        request = OpenAIRequest(body=body, model=holder.models[0])
    else:
        request = parse_openai_request(body)
        if request.previous_response_id is not None:
            holder = await gateway.holder_of(request.previous_response_id, request.model)
    gateway.keys.require_model(key, request.model)
    request, charge = await gateway.accounts.open(key, request, route)
    if holder is None and route not in UNQUEUED_ROUTES:
        turn = gateway.fair_share.take(request.model, key)
        if turn is not None:
            charge.turn = turn
        elif not await _wait_turn(gateway, route, key, request.model, charge, receive):
            return  # the client left while it waited
    gateway.proxy.forward(route, scope["method"].encode(), _target(scope), request, responder, holder, charge)
    await responder.run(receive)


async def _wait_turn(
    gateway: GatewayState, route: str, key: ApiKey | None, model: str, charge: Charge, receive: Receive
) -> bool:
    """Wait for the model's fair share to let this request out (it is full); False if the
    client left meanwhile. A request refused or left here is settled as such."""
    started = gateway.loop.time()
    try:
        turn = await gateway.fair_share.wait(model, key, receive)
    except VpoolError as exc:
        charge.settle(model, exc.status_code)
        raise
    if turn is None:
        charge.usage = Usage()
        charge.settle(model, CLIENT_LEFT)
        gateway.metrics.answered(route, model, CLIENT_LEFT, gateway.loop.time() - started)
        return False
    charge.turn = turn
    return True


def _read_headers(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, int | None, bool]:
    """The key, the declared body length and `Expect: 100-continue`, in one pass."""
    authorization: bytes | None = None
    declared: int | None = None
    expects_continue = False
    for name, value in headers:
        if name == b"authorization":
            if authorization is not None:
                raise duplicate_authorization()
            authorization = value
        elif name == b"content-length":
            declared = int(value)  # uvicorn has checked it is one well-formed number
        elif name == b"expect":
            expects_continue = value.lower() == b"100-continue"
    return (
        (authorization.decode("latin-1") if authorization is not None else None),
        declared,
        expects_continue,
    )


async def _read_body(
    receive: Receive, declared: int | None, expects_continue: bool, limit: int
) -> bytes | None:
    """The whole body, at most `limit` bytes (else 413); None if the client left."""
    if declared is not None and declared > limit:
        if not expects_continue:  # it is sending the body anyway: read it, so it sees our answer
            await _discard(receive, declared)
        raise _too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise _too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body", False):
                await _discard(receive, MAX_DISCARD_BYTES)
            raise _too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _discard(receive: Receive, up_to: int) -> None:
    dropped = 0
    while dropped <= min(up_to, MAX_DISCARD_BYTES):
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _target(scope: Scope) -> bytes:
    """The request's path and query as the client sent them, to send on unchanged."""
    path: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    return path + b"?" + query if query else path


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(
        f"The request body is larger than the limit of {limit} bytes.",
        # Part of the body may be unread: nothing after it on this connection can be trusted.
        headers={"Connection": "close"},
    )


class MethodNotAllowed(InvalidRequest):
    status_code = 405
    default_code = "method_not_allowed"

    def __init__(self, method: str, path: str) -> None:
        super().__init__(f"Method {method} is not allowed on {path}.", headers={"Allow": "POST"})


class ResponseNotFound(NotFound):
    default_code = "response_not_found"

    def __init__(self, response_id: str) -> None:
        super().__init__(
            f"Response with id '{response_id}' not found on any ready worker.", param="response_id"
        )
