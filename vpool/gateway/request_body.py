"""Check an OpenAI request body once, without re-serializing it.

Only `model` is kept (and `previous_response_id`, which says which worker must answer; the
types of `stream` and `stream_options` are checked); the original bytes go to the worker,
which validates everything else itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from vpool.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    body: bytes
    model: str
    previous_response_id: str | None = None


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
    return OpenAIRequest(body=body, model=model, previous_response_id=previous)
