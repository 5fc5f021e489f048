"""Usage read out of workers' answers, and taken out again of streams that did not ask for it.

The events are shaped as vLLM 0.32 writes them (`model_dump_json(exclude_unset=True)`): with
`continuous_usage_stats` every chunk ends in `"usage":{...}`, and `include_usage` adds a
final chunk with `"choices":[]`. The real engines' streams are compared in
tests/integration/test_usage.py.
"""

from __future__ import annotations

import json

import pytest

from vpool.gateway.request_body import OpenAIRequest, parse_openai_request, with_usage_asked
from vpool.gateway.usage_reading import StreamUsage, Usage, UsageAsked, usage_in

FINGERPRINT = "vllm-0.32.0-d4051fc8"


def chunk(
    i: int, usage: dict | None, final: bool = False, last: bool = False, fingerprint: bool = False
) -> bytes:
    event: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    finish = "length" if last else None
    event["choices"] = [] if final else [{"index": 0, "delta": {"content": f"t{i}"}, "finish_reason": finish}]
    if usage is not None:
        event["usage"] = usage
    if fingerprint:  # vLLM: on the final usage chunk, or on the finishing one when none is asked
        event["system_fingerprint"] = FINGERPRINT
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def worker_stream(tokens: int) -> bytes:
    """What the worker sends when asked for continuous usage (vpool always asks)."""
    events = [chunk(i, usage(7, i + 1), last=i == tokens - 1) for i in range(tokens)]
    events.append(chunk(0, {**usage(7, tokens), "prompt_tokens_details": None}, final=True, fingerprint=True))
    return b"".join(events) + b"data: [DONE]\n\n"


def expected(tokens: int, asked: UsageAsked) -> bytes:
    """What the worker would have sent for what the client asked."""
    if asked is UsageAsked.CONTINUOUS:
        return worker_stream(tokens)
    none = asked is UsageAsked.NONE
    events = [
        chunk(i, None, last=i == tokens - 1, fingerprint=none and i == tokens - 1) for i in range(tokens)
    ]
    if asked is UsageAsked.FINAL:
        events.append(
            chunk(0, {**usage(7, tokens), "prompt_tokens_details": None}, final=True, fingerprint=True)
        )
    return b"".join(events) + b"data: [DONE]\n\n"


def relay(reader: StreamUsage, data: bytes, cut: int) -> bytes:
    """Feed `data` in pieces of `cut` bytes, as reads from a socket would split it."""
    out = b"".join(reader.feed(data[i : i + cut]) for i in range(0, len(data), cut))
    return out + reader.rest()


@pytest.mark.parametrize("asked", list(UsageAsked))
@pytest.mark.parametrize("cut", [1, 7, 64, 100_000])
def test_the_client_receives_what_it_would_have_without_vpool_asking(asked: UsageAsked, cut: int) -> None:
    reader = StreamUsage(asked, strip=True)
    assert relay(reader, worker_stream(5), cut) == expected(5, asked)
    assert reader.usage == Usage(7, 5)


def test_a_stream_left_early_is_counted_up_to_its_last_whole_chunk() -> None:
    reader = StreamUsage(UsageAsked.NONE, strip=True)
    data = worker_stream(10)
    third_chunk_end = data.index(b"\n\n", data.index(b"t2")) + 2
    relayed = reader.feed(data[: third_chunk_end + 5])  # and a little of the fourth
    assert relayed.count(b"data: ") == 3 and b"usage" not in relayed
    assert reader.usage == Usage(7, 3)


def test_a_stream_not_stripped_passes_unchanged_and_is_still_read() -> None:
    reader = StreamUsage(UsageAsked.NONE, strip=False)
    responses = (
        b'event: response.created\ndata: {"type":"response.created","response":{"usage":null}}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":{"output":[],'
        b'"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,'
        b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15}}}\n\n'
    )
    assert relay(reader, responses, 9) == responses
    assert reader.usage == Usage(11, 4)


def test_an_unfinished_event_is_held_and_given_back_at_the_end() -> None:
    reader = StreamUsage(UsageAsked.NONE, strip=True)
    assert reader.feed(b'data: {"partial":') == b""
    assert reader.rest() == b'data: {"partial":'
    assert reader.rest() == b""


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b'{"choices":[],"usage":{"prompt_tokens":3,"total_tokens":9,"completion_tokens":6}}', Usage(3, 6)),
        (b'{"data":[{"embedding":[0.1,0.2]}],"usage":{"prompt_tokens":4,"total_tokens":4}}', Usage(4, 0)),
        (
            b'{"output":[],"usage":{"input_tokens":5,"output_tokens":2,"input_tokens_details":{"c":0}}}',
            Usage(5, 2),
        ),
        # a value that mentions usage is escaped, so never mistaken for it
        (b'{"content":"say \\"usage\\":{\\"prompt_tokens\\":99}","usage":{"prompt_tokens":1}}', Usage(1, 0)),
        (b'{"usage":null}', None),
        (b'{"usage":{"prompt_tokens":"3"}}', None),
        (b'{"usage":{"prompt_tokens":3', None),
        (b'{"count":3,"tokens":[1,2,3]}', None),
    ],
)
def test_usage_is_found_in_an_answer_without_parsing_all_of_it(body: bytes, found: Usage | None) -> None:
    assert usage_in(body) == found


def request(body: dict) -> OpenAIRequest:
    return parse_openai_request(json.dumps(body).encode())


def test_a_stream_is_asked_for_continuous_usage_keeping_the_clients_bytes() -> None:
    plain = request({"model": "m", "stream": True, "max_tokens": 5})
    asked = with_usage_asked(plain)
    assert asked.body.startswith(plain.body[:-1])
    merged = json.loads(asked.body)
    assert merged["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert asked.usage_asked is UsageAsked.NONE and asked.max_tokens == 5

    # what the client asked is kept, and said again last (a repeated key's last value wins)
    own = request({"model": "m", "stream": True, "stream_options": {"include_usage": True}})
    assert own.usage_asked is UsageAsked.FINAL
    assert json.loads(with_usage_asked(own).body)["stream_options"]["continuous_usage_stats"] is True

    both = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    assert with_usage_asked(request(both)).body == request(both).body
    not_streamed = request({"model": "m", "max_completion_tokens": 9})
    assert with_usage_asked(not_streamed) is not_streamed and not_streamed.max_tokens == 9


def test_a_request_without_max_tokens_or_with_a_bad_one_has_none() -> None:
    assert request({"model": "m"}).max_tokens is None
    assert request({"model": "m", "max_tokens": "many"}).max_tokens is None
    assert request({"model": "m", "max_tokens": True}).max_tokens is None
    assert request({"model": "m", "max_output_tokens": 12}).max_tokens == 12


def test_a_stream_that_reports_prompt_and_completion_in_different_events_is_counted_whole() -> None:
    reader = StreamUsage(UsageAsked.NONE, strip=False)
    messages = (
        b'event: message_start\ndata: {"type":"message_start",'
        b'"message":{"usage":{"input_tokens":9,"output_tokens":1}}}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":6}}\n\n'
    )
    assert relay(reader, messages, 13) == messages
    assert reader.usage == Usage(9, 6)
