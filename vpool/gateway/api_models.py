"""Pydantic models of the gateway's public API: the bodies of its FastAPI routes, and the
schemas `/openapi.json` gives for the data routes.

The data routes never validate through these (the worker does, and the gateway forwards the
original bytes): they tell a reader, a client generator or schemathesis what each route
takes and gives. Every request model allows fields beyond those listed, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- errors -----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """Every error the gateway answers, whatever the route or status."""

    error: ErrorDetail


# --- models, health ---------------------------------------------------------------------


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "vpool"
    max_model_len: int | None = Field(
        None, description="The longest context its workers take, where they say."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GatewayHealth(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="degraded: routing on a fleet snapshot the registry does not (or cannot) confirm"
    )
    registry: Literal["ok", "unavailable"]
    models: dict[str, int] = Field(description="ready workers per model")
    retained_workers: int = Field(description="workers kept in routing after the registry lost them")
    last_refresh_age_s: float | None
    keys: Literal["ok", "unavailable"] = Field(
        "ok", description="unavailable: the key store is away; the keys last read keep working"
    )
    limits: Literal["shared", "local", "degraded"] = Field(
        "local",
        description="shared: enforced across gateways through Redis; local: one gateway, no Redis;"
        " degraded: Redis away, each gateway enforcing its share of every limit",
    )
    gateways_sharing_limits: int = Field(1, description="gateways alive when the limits were last shared")
    usage: Literal["ok", "unavailable"] = Field(
        "ok", description="unavailable: usage is counted here until the store is back"
    )
    waiting: dict[str, int] = Field(
        default_factory=dict,
        description="requests waiting for a fair share, per model whose every worker is full",
    )


# --- data route requests ----------------------------------------------------------------


class _ModelRequest(_Open):
    model: str = Field(min_length=1, description="A model name the gateway serves: it picks the worker.")


class _Streaming(_ModelRequest):
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None


class ChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Streaming):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Streaming):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None


class EmbeddingRequest(_ModelRequest):
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None


class ResponsesRequest(_Streaming):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = Field(
        None, description="Continues a stored response: the request goes to the worker that holds it."
    )
    max_output_tokens: int | None = None
    store: bool | None = None


class MessagesRequest(_Streaming):
    """Anthropic's Messages API, as vLLM serves it."""

    messages: list[dict[str, Any]]
    max_tokens: int


class TokenizeRequest(_ModelRequest):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None


class DetokenizeRequest(_ModelRequest):
    tokens: list[int]


class PoolingRequest(_ModelRequest):
    input: str | list[str] | list[int] | list[list[int]]


class ClassifyRequest(_ModelRequest):
    input: str | list[str]


class ScoreRequest(_ModelRequest):
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None


class RerankRequest(_ModelRequest):
    query: str
    documents: list[str]
    top_n: int | None = None


# --- data route answers (as the worker gives them; passed through unchanged) -------------


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class EmbeddingList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    model: str
    usage: Usage | None = None


class Response(_Open):
    id: str
    object: Literal["response"]
    status: str
    output: list[dict[str, Any]]


class WorkerAnswer(_Open):
    """Whatever JSON the worker's engine gives for this route (vLLM's own schema)."""
