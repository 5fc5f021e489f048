"""Read the tokens a worker reports in its answers, without parsing whole answers.

A JSON answer's `usage` object is found by its key and only that object is parsed: an
embeddings answer is mostly floats, and parsing it all would cost more than relaying it.
Inside a JSON string every quote is escaped, so `"usage":` cannot match inside a value.

A stream is read event by event. vpool asks the worker for usage on every chunk
(`stream_options.continuous_usage_stats`), so a stream the client leaves is counted up to
its last relayed chunk; what the client did not ask for is taken out again, and the client
receives the bytes it would have received otherwise:
- it asked for nothing: `usage` is cut from every chunk, and the final usage chunk
  (`"choices":[]`) is dropped; its `system_fingerprint` goes back on the chunk that
  finished the choice, where vLLM puts it when no usage is asked (that chunk is held until
  the next event says whether one comes);
- it asked for `include_usage` only: cut from every chunk but the final one;
- it asked for continuous usage itself, or the route has its own usage events (responses):
  the stream passes unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

import orjson

USAGE_KEY = b'"usage":'
_FINAL_CHUNK = b'"choices":[]'
_FINISHED = b'"finish_reason":"'
_FINGERPRINT = re.compile(rb'"system_fingerprint":"[^"]*"')


class UsageAsked(IntEnum):
    """What usage a streaming client asked for in `stream_options`."""

    NONE = 0
    FINAL = 1  # include_usage
    CONTINUOUS = 2  # include_usage and continuous_usage_stats


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_span(data: bytes, start: int = 0) -> tuple[int, int] | None:
    """Where the last `"usage":{...}` in `data[start:]` lies, from its key to its brace."""
    at = data.rfind(USAGE_KEY, start)
    if at < 0:
        return None
    opening = at + len(USAGE_KEY)
    while opening < len(data) and data[opening] in b" \t":
        opening += 1
    if opening >= len(data) or data[opening] != ord("{"):
        return None  # "usage": null
    depth = 0
    for i in range(opening, len(data)):  # usage holds numbers and objects only, no strings
        byte = data[i]
        if byte == ord("{"):
            depth += 1
        elif byte == ord("}"):
            depth -= 1
            if depth == 0:
                return at, i + 1
    return None


def usage_in(data: bytes, start: int = 0) -> Usage | None:
    """The usage a JSON answer or event reports (chat, completions, embeddings, responses)."""
    span = usage_span(data, start)
    if span is None:
        return None
    try:
        found = orjson.loads(data[span[0] + len(USAGE_KEY) : span[1]])
    except orjson.JSONDecodeError:
        return None
    prompt = found.get("prompt_tokens", found.get("input_tokens", 0))
    completion = found.get("completion_tokens", found.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion or 0)


class StreamUsage:
    """Reads usage out of an event stream and takes out what the client did not ask for.

    `feed` returns the bytes to relay now: whole events only, the rest is held until its
    end arrives (`rest` gives what is held when the stream ends).
    """

    __slots__ = ("_asked", "_finished", "_held", "_strip", "usage")

    def __init__(self, asked: UsageAsked, strip: bool) -> None:
        self._asked = asked
        self._strip = strip and asked is not UsageAsked.CONTINUOUS
        self._held = b""
        self._finished: bytes | None = None  # a finishing chunk, held for its fingerprint
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> bytes:
        if self._held:
            data = self._held + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self._held = data
            return b""
        end += 2
        self._held = data[end:]
        whole = data[:end]
        if USAGE_KEY not in whole:
            return whole
        if not self._strip:
            self._note(whole)
            return whole
        return b"".join(self._filter(event) for event in whole.split(b"\n\n")[:-1])

    def rest(self) -> bytes:
        held, self._held = self._held, b""
        return self._release() + held

    def _release(self, fingerprint: bytes = b"") -> bytes:
        finished, self._finished = self._finished, None
        if finished is None:
            return b""
        if fingerprint:
            end = finished.rindex(b"}")
            finished = finished[:end] + b"," + fingerprint + finished[end:]
        return finished + b"\n\n"

    def _note(self, events: bytes) -> None:
        usage = usage_in(events)
        if usage is None:
            return
        seen = self.usage
        if seen is not None:
            # Counts only grow in a stream; some say each in a different event
            # (/v1/messages: the prompt in message_start, the completion in message_delta).
            usage = Usage(
                max(seen.prompt_tokens, usage.prompt_tokens),
                max(seen.completion_tokens, usage.completion_tokens),
            )
        self.usage = usage

    def _filter(self, event: bytes) -> bytes:
        span = usage_span(event)
        if span is None:
            return self._release() + event + b"\n\n"
        self._note(event)
        if _FINAL_CHUNK in event:
            if self._asked is UsageAsked.FINAL:
                return self._release() + event + b"\n\n"
            fingerprint = _FINGERPRINT.search(event)
            return self._release(fingerprint[0] if fingerprint else b"")
        start, end = span
        if event[start - 1 : start] == b",":
            start -= 1  # the comma before the key
        elif event[end : end + 1] == b",":
            end += 1  # or, first in its object, the one after it
        released = self._release()
        event = event[:start] + event[end:]
        if self._asked is UsageAsked.NONE and _FINISHED in event:
            self._finished = event
            return released
        return released + event + b"\n\n"
