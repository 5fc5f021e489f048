"""Render every error an app can raise as an OpenAI error body, in one place."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vpool.errors import VpoolError, error_body, error_type_for_status

log = logging.getLogger("vpool")


def error_response(exc: VpoolError) -> Response:
    return Response(
        orjson.dumps(exc.body()),
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


def _json(status: int, body: dict[str, object]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _on_vpool_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VpoolError)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg", "invalid body"))
    return _json(400, error_body(message, "invalid_request_error", param=param))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    code: str | int = exc.status_code
    if exc.status_code == 404:
        message, code = f"Unknown route: {request.method} {request.url.path}", "unknown_route"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
        code = "method_not_allowed"
    response = _json(exc.status_code, error_body(message, error_type_for_status(exc.status_code), code=code))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _json(500, error_body("The server had an internal error.", "server_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(VpoolError, _on_vpool_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
