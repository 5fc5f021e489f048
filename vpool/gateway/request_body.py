"""Check an OpenAI request body once, without re-serializing it.

Only what the gateway acts on is kept: `model`, `previous_response_id` (which worker must
answer), whether it streams and what usage it asked for, and `max_tokens` (the token limits
charge it up front). The original bytes go to the worker, which validates everything else;
a stream that did not ask for usage gets `stream_options` added at its end (`with_usage_asked`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from vpool.errors import InvalidRequest
from vpool.gateway.usage_reading import UsageAsked

# Bytes of a request body per prompt token, for the up-front estimate: English runs about
# four characters a token, and a body's JSON around the prompt makes it an overestimate.
BYTES_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    body: bytes
    model: str
    previous_response_id: str | None = None
    stream: bool = False
    usage_asked: UsageAsked = UsageAsked.NONE
    max_tokens: int | None = None
    data: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def prompt_estimate(self) -> int:
        """Prompt tokens, guessed from the body's size before the worker counts them."""
        return len(self.body) // BYTES_PER_TOKEN + 1


def with_usage_asked(request: OpenAIRequest) -> OpenAIRequest:
    """The request asking its worker for usage on every stream chunk (see usage_reading.py)."""
    if request.data is None or not request.stream or request.usage_asked is UsageAsked.CONTINUOUS:
        return request
    options = {**(request.data.get("stream_options") or {}), "include_usage": True}
    options["continuous_usage_stats"] = True
    # Added as the object's last member, the client's bytes untouched before it: a JSON
    # object's repeated key takes its last value (Python's json, so vLLM, reads it so).
    end = request.body.rindex(b"}")
    body = b"%b,%b:%b%b" % (
        request.body[:end],
        b'"stream_options"',
        orjson.dumps(options),
        request.body[end:],
    )
    return replace(request, body=body)


def parse_openai_request(body: bytes) -> OpenAIRequest:
    """Check the few fields the gateway relies on; 400 with an OpenAI error otherwise."""
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}).", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = data.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("`model` must be a non-empty string.", param="model")
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean.", param="stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object.", param="stream_options")
    previous = data.get("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise InvalidRequest(
            "`previous_response_id` must be a non-empty string.", param="previous_response_id"
        )
    return OpenAIRequest(
        body=body,
        model=model,
        previous_response_id=previous,
        stream=stream,
        usage_asked=_usage_asked(options) if stream else UsageAsked.NONE,
        max_tokens=_max_tokens(data),
        data=data,
    )


def _usage_asked(options: dict[str, Any] | None) -> UsageAsked:
    if not options or not options.get("include_usage"):
        return UsageAsked.NONE
    return UsageAsked.CONTINUOUS if options.get("continuous_usage_stats") else UsageAsked.FINAL


def _max_tokens(data: dict[str, Any]) -> int | None:
    """The most tokens the request may generate, if it says (the worker checks the type)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None
