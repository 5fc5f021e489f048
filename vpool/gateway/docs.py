"""`/openapi.json` (and `/docs` over it) for every route, the raw ASGI data routes included.

FastAPI describes its own routes. The data routes are not FastAPI routes (see
vpool/gateway/data_routes.py), so their operations are added here from the pydantic models
in vpool/gateway/api_models.py, with the error answers every route can give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from vpool.gateway import api_models as m
from vpool.gateway.data_routes import RESPONSES_PREFIX

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class _Operation:
    summary: str
    request: type[BaseModel]
    answer: type[BaseModel]
    streams: bool = False


_OPERATIONS: dict[str, _Operation] = {
    "/v1/chat/completions": _Operation("Chat completion", m.ChatCompletionRequest, m.ChatCompletion, True),
    "/v1/completions": _Operation("Text completion", m.CompletionRequest, m.Completion, True),
    "/v1/embeddings": _Operation("Embeddings", m.EmbeddingRequest, m.EmbeddingList),
    "/v1/responses": _Operation("Create a response (Responses API)", m.ResponsesRequest, m.Response, True),
    "/v1/messages": _Operation("Anthropic Messages", m.MessagesRequest, m.WorkerAnswer, True),
    "/v1/messages/count_tokens": _Operation("Anthropic token count", m.MessagesRequest, m.WorkerAnswer),
    "/tokenize": _Operation("Tokenize a prompt or a conversation", m.TokenizeRequest, m.WorkerAnswer),
    "/detokenize": _Operation("Turn token ids back into text", m.DetokenizeRequest, m.WorkerAnswer),
    "/pooling": _Operation("Raw pooled outputs", m.PoolingRequest, m.WorkerAnswer),
    "/classify": _Operation("Classify", m.ClassifyRequest, m.WorkerAnswer),
    "/score": _Operation("Score text pairs", m.ScoreRequest, m.WorkerAnswer),
    "/v1/score": _Operation("Score text pairs", m.ScoreRequest, m.WorkerAnswer),
    "/rerank": _Operation("Rerank documents", m.RerankRequest, m.WorkerAnswer),
    "/v1/rerank": _Operation("Rerank documents", m.RerankRequest, m.WorkerAnswer),
    "/v2/rerank": _Operation("Rerank documents", m.RerankRequest, m.WorkerAnswer),
    "/v2/embed": _Operation("Embed (Cohere v2 shape)", m.EmbeddingRequest, m.WorkerAnswer),
}

_ERRORS = {
    "400": "Malformed JSON, a missing or empty `model`, a bad field type, or the worker's own validation",
    "401": "Missing or wrong API key",
    "404": "No such model (or stored response)",
    "405": "Wrong method",
    "413": "Body over the gateway's limit",
    "502": "No worker could be reached",
    "503": "No ready worker for the model right now (see Retry-After)",
    "504": "The worker did not answer in time",
}


def install_docs(app: FastAPI) -> None:
    """Make `app.openapi()` describe the data routes too."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _add_data_routes(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_data_routes(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    paths = schema.setdefault("paths", {})
    security = _bearer(schema)
    for path, op in _OPERATIONS.items():
        request_ref = _component(components, op.request)
        content: dict[str, Any] = {
            "application/json": {"schema": {"$ref": _component(components, op.answer)}}
        }
        if op.streams:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "Server-sent events, ending `data: [DONE]`"}
            }
        paths[path] = {
            "post": {
                "summary": op.summary,
                "operationId": "post_" + path.strip("/").replace("/", "_"),
                "tags": ["data"],
                "security": security,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": request_ref}}},
                },
                "responses": {
                    "200": {"description": "The worker's answer, relayed unchanged", "content": content},
                    **_error_answers(components),
                },
            }
        }
    response_id = {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
    follow_up = {
        "tags": ["data"],
        "security": security,
        "parameters": [response_id],
        "responses": {
            "200": {
                "description": "The stored response, from the worker that holds it",
                "content": {"application/json": {"schema": {"$ref": _component(components, m.Response)}}},
            },
            **_error_answers(components),
        },
    }
    paths[RESPONSES_PREFIX + "{response_id}"] = {
        "get": {**follow_up, "summary": "Retrieve a stored response", "operationId": "get_response"}
    }
    paths[RESPONSES_PREFIX + "{response_id}/cancel"] = {
        "post": {**follow_up, "summary": "Cancel a background response", "operationId": "cancel_response"}
    }


def _component(components: dict[str, Any], model: type[BaseModel]) -> str:
    generated = model.model_json_schema(ref_template=REF)
    for name, definition in generated.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, generated)
    return REF.format(model=model.__name__)


def _error_answers(components: dict[str, Any]) -> dict[str, Any]:
    ref = {"$ref": _component(components, m.ErrorResponse)}
    return {
        status: {"description": why, "content": {"application/json": {"schema": ref}}}
        for status, why in _ERRORS.items()
    }


def _bearer(schema: dict[str, Any]) -> list[dict[str, list[str]]]:
    schemes = schema["components"].setdefault("securitySchemes", {})
    schemes.setdefault("bearer", {"type": "http", "scheme": "bearer", "description": "An API key, where set"})
    return [{"bearer": []}, {}]
