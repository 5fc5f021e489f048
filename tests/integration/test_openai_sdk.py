"""The official openai SDK against the gateway, in front of real vLLM engines on the CPU."""

from __future__ import annotations

import math

import openai
import pytest
from openai import OpenAI

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Hello there"}]


def test_chat_completion_answers_with_text_and_usage(client: OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=8)
    assert reply.object == "chat.completion"
    assert reply.model == "tiny-chat"
    assert reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_arrives_in_chunks_with_usage_last(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=HELLO,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


def test_content_parts_messages_are_accepted(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Describe this"}]}],
        max_tokens=4,
    )
    assert reply.choices[0].message.content is not None


def test_n_returns_that_many_choices(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny-chat", messages=HELLO, max_tokens=4, n=3, temperature=1.0
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]


def test_max_tokens_and_temperature_zero_are_honoured(client: OpenAI) -> None:
    kwargs = dict(model="tiny-chat", prompt="once upon a time", max_tokens=6, temperature=0.0)
    first = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    second = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert first.usage is not None and first.usage.completion_tokens == 6
    assert first.choices[0].finish_reason == "length"
    assert first.choices[0].text == second.choices[0].text  # greedy decoding is deterministic


def test_stop_string_ends_the_completion(client: OpenAI) -> None:
    free = client.completions.create(
        model="tiny-chat", prompt="the", max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    assert len(text) > 2
    stop_at = text[len(text) // 2 :].strip()[:3] or text[-2:]
    stopped = client.completions.create(
        model="tiny-chat", prompt="the", max_tokens=16, temperature=0.0, stop=[stop_at],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_at not in stopped.choices[0].text
    assert len(stopped.choices[0].text) < len(text)


def test_completions_stream_ends_with_usage(client: OpenAI) -> None:
    stream = client.completions.create(
        model="tiny-chat",
        prompt="hello",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def test_embeddings_are_384_dimensional_unit_vectors_that_differ(client: OpenAI) -> None:
    result = client.embeddings.create(
        model="minilm", input=["a cat sits on the mat", "quarterly revenue grew"]
    )
    assert [d.index for d in result.data] == [0, 1]
    first, second = (d.embedding for d in result.data)
    assert len(first) == len(second) == 384
    for vector in (first, second):
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-3)
    cosine = sum(a * b for a, b in zip(first, second, strict=True))
    assert cosine < 0.9
    assert result.usage.prompt_tokens > 0


def test_similar_sentences_embed_closer_than_unrelated_ones(client: OpenAI) -> None:
    data = client.embeddings.create(
        model="minilm", input=["a cat sits on the mat", "a kitten rests on a rug", "tax law reform"]
    ).data
    cat, kitten, tax = (d.embedding for d in data)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(cat, kitten) > cos(cat, tax)


def test_models_lists_every_model_with_a_ready_worker(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {"tiny-chat", "minilm"} <= ids


def test_unknown_model_raises_not_found_naming_it(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in caught.value.message


def test_wrong_key_raises_authentication_error(fleet) -> None:
    with OpenAI(base_url=f"{fleet.gateway_url}/v1", api_key="sk-wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_context_overflow_is_a_bad_request_from_the_worker(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-chat", prompt="word " * 3000, max_tokens=4)
    assert caught.value.status_code == 400
    assert caught.value.body is not None


def test_bad_parameter_is_a_bad_request_from_the_worker(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=4, n=0)


def test_second_gateway_serves_the_same_fleet(fleet) -> None:
    with OpenAI(base_url=f"{fleet.gateway_urls[1]}/v1", api_key="sk-test-key", max_retries=0) as other:
        reply = other.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=2)
    assert reply.choices[0].message.content is not None
