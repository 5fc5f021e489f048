"""The requests a benchmark sends, and a check that a system answers each one correctly.

wrk counts bytes and status codes, not meaning: a gateway that answered every stream with
an empty 200 would look fast. So before a case is loaded, one request of it goes through the
system under test and its answer is checked (the JSON shape, every SSE event up to
`data: [DONE]`, the embedding's size).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

MODEL = "stub"
STUB_EVENTS = 16
STUB_DIM = 384


@dataclass(frozen=True)
class Case:
    name: str
    path: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    def body_bytes(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode()


_MESSAGES = [{"role": "user", "content": "Say hello in sixteen words."}]

CASES: dict[str, Case] = {
    "chat": Case("chat", "/v1/chat/completions", {"model": MODEL, "messages": _MESSAGES, "max_tokens": 16}),
    "stream": Case(
        "stream",
        "/v1/chat/completions",
        {"model": MODEL, "messages": _MESSAGES, "max_tokens": 16, "stream": True},
    ),
    "embeddings": Case("embeddings", "/v1/embeddings", {"model": MODEL, "input": "a sentence to embed"}),
}


class BadAnswer(RuntimeError):
    """A system answered a case with the wrong status or shape."""


def post(url: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def sse_data(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    events = body.replace(b"\r\n", b"\n").split(b"\n\n")
    return [line[5:].strip() for event in events for line in event.split(b"\n") if line.startswith(b"data:")]


def check_answer(case: Case, status: int, body: bytes) -> None:
    """Raise BadAnswer unless `body` is what the stub's answer looks like through a gateway."""
    if status != 200:
        raise BadAnswer(f"{case.name}: status {status}: {body[:300]!r}")
    if case.stream:
        data = sse_data(body)
        if not data or data[-1] != b"[DONE]":
            raise BadAnswer(f"{case.name}: stream does not end with `data: [DONE]`: {body[-300:]!r}")
        # A gateway may add an event (LiteLLM sends a last one with `finish_reason`).
        content = [d for d in data[:-1] if b'"content"' in d]
        if len(content) < STUB_EVENTS:
            raise BadAnswer(f"{case.name}: {len(content)} content events, expected {STUB_EVENTS}")
        return
    try:
        answer = json.loads(body)
    except ValueError as error:
        raise BadAnswer(f"{case.name}: not JSON: {body[:300]!r}") from error
    if case.name == "embeddings":
        vector = answer.get("data", [{}])[0].get("embedding")
        if not isinstance(vector, list) or len(vector) != STUB_DIM:
            raise BadAnswer(f"{case.name}: no {STUB_DIM}-float embedding: {body[:300]!r}")
    elif not answer.get("choices"):
        raise BadAnswer(f"{case.name}: no choices: {body[:300]!r}")


def preflight(base_url: str, case: Case) -> None:
    """One request of `case` through the system at `base_url`, checked."""
    status, body = post(base_url + case.path, case.body_bytes())
    check_answer(case, status, body)
