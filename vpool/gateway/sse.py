"""The one place that frames server-sent events (the gateway passes the worker's own
events through untouched; it only ever writes an error event of its own)."""

from __future__ import annotations

import orjson

from vpool.errors import error_body


def error_event(message: str, error_type: str = "upstream_error", code: str | None = None) -> bytes:
    """An OpenAI-style error event; no `[DONE]` follows, so no client mistakes it for the end."""
    return b"data: " + orjson.dumps(error_body(message, error_type, code=code)) + b"\n\n"
