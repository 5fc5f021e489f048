"""The one exception tree of vpool, rendered once at the edge as an OpenAI error body.

    VpoolError                      500 server_error
     ├── InvalidRequest             400 invalid_request_error
     │    └── RequestTooLarge       413 invalid_request_error
     ├── AuthenticationFailed       401 invalid_request_error / invalid_api_key
     ├── PermissionDenied           403 invalid_request_error / permission_denied
     ├── NotFound                   404 invalid_request_error
     │    └── ModelNotFound         404 invalid_request_error / model_not_found
     ├── ServiceUnavailable         503 service_unavailable (something vpool needs is away)
     │    ├── NoWorkerAvailable     503 service_unavailable / no_worker_available (Retry-After)
     │    └── EngineUnavailable     503 service_unavailable / engine_unavailable (its engine died)
     ├── UpstreamError              502 upstream_error
     └── UpstreamTimeout            504 timeout

The controller's RegistryDown (registry_unavailable) and KeyStoreDown (key_store_unavailable)
are ServiceUnavailable too.

The body is always `{"error": {"message", "type", "param", "code"}}` with the status the
OpenAI API would use: never FastAPI's `{"detail": ...}`, never a traceback.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class VpoolError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)

    def json(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(VpoolError):
    status_code = 400
    error_type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    status_code = 413
    default_code = "request_too_large"


class AuthenticationFailed(VpoolError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(VpoolError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(VpoolError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class ServiceUnavailable(VpoolError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"


class NoWorkerAvailable(ServiceUnavailable):
    default_code = "no_worker_available"

    def __init__(self, model: str, retry_after_s: int = 1) -> None:
        super().__init__(
            f"No ready worker serves the model `{model}` right now; retry shortly.",
            param="model",
            headers={"Retry-After": str(retry_after_s)},
        )


class EngineUnavailable(ServiceUnavailable):
    default_code = "engine_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "This worker's vLLM engine has stopped; it is leaving the pool. Retry: a gateway"
            " sends the request to another worker.",
            headers={"Retry-After": "1"},
        )


class UpstreamError(VpoolError):
    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamTimeout(VpoolError):
    status_code = 504
    error_type = "timeout"
    default_code = "upstream_timeout"


def error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_type_for_status(status: int) -> str:
    """The OpenAI error type a bare status maps to, for bodies we must wrap."""
    if status == 401:
        return "invalid_request_error"
    if 400 <= status < 500:
        return "invalid_request_error"
    if status == 503:
        return "service_unavailable"
    return "server_error"


def ensure_openai_error_body(status: int, raw: bytes) -> bytes | None:
    """Return a replacement body when an upstream error body is not OpenAI-shaped.

    vLLM answers some errors as `{"detail": ...}` or `{"error": "Unauthorized"}`; clients
    expect `{"error": {"message": ...}}`. Returns None when `raw` is already well-shaped.
    """
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        if "message" in parsed["error"]:
            return None
    message: str
    if isinstance(parsed, dict):
        detail = parsed.get("detail", parsed.get("error", parsed.get("message")))
        message = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    else:
        message = raw.decode("utf-8", "replace").strip() or f"Upstream answered HTTP {status}."
    return orjson.dumps(error_body(message, error_type_for_status(status), code=status))
