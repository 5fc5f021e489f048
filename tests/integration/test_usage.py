"""Usage you can bill from, on real engines: the tokens vpool counts are the engines' own.

A key made through the admin API sends chat and completions, streamed and not, with and
without `include_usage`, through both gateways, with `ignore_eos` and a fixed `max_tokens`
so every answer's length is known. The store's counts (`GET /admin/v1/usage`) and
`vpool_tokens_total` must equal what the engines reported; a stream whose client did not
ask for usage must reach the client exactly as the worker would send it without vpool
asking; a stream the client leaves is counted up to what it was sent.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Fleet

pytestmark = pytest.mark.integration

MAX_TOKENS = 8
CHAT: dict[str, Any] = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "count to ten"}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
}
COMPLETION: dict[str, Any] = {
    "model": "tiny-chat",
    "prompt": "one two three",
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
}
SETTLE_S = 10.0
EXTRA = {"extra_body": {"ignore_eos": True}}  # vLLM's own field: the SDK sends it this way


def _sdk(body: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: v for k, v in body.items() if k != "ignore_eos"},
        **EXTRA,
    }  # gateways write usage about once a second


def _make_key(fleet: Fleet, name: str, **limits: int) -> tuple[str, str]:
    made = httpx.post(f"{fleet.controller_url}/admin/v1/keys", json={"name": name, **limits}, timeout=10)
    assert made.status_code == 201, made.text
    secret, key_id = made.json()["secret"], made.json()["key"]["key_id"]
    for url in fleet.gateway_urls:  # every gateway reads new keys within about a second
        deadline = time.monotonic() + SETTLE_S
        while httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code != 200:
            assert time.monotonic() < deadline, "the new key did not reach the gateway"
            time.sleep(0.1)
    return secret, key_id


def _events(raw: bytes) -> list[Any]:
    """A stream's events, without what differs from one request to the next."""
    events = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        data = block[len(b"data: ") :]
        if data == b"[DONE]":
            events.append("[DONE]")
            continue
        event = json.loads(data)
        event.pop("id")
        event.pop("created")
        events.append(event)
    return events


def _shape(events: list[Any]) -> tuple[str, list[str], set[tuple[str, ...]], Any]:
    """What a stream says, whatever its chunking (the engine may put several tokens in one
    chunk when it is busy): the text, the finish reasons, each chunk's fields, its end."""
    text, finished, fields = "", [], set()
    for event in events[:-1]:
        fields.add(tuple(event))
        for choice in event["choices"]:
            text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                finished.append(choice["finish_reason"])
    return text, finished, fields, events[-1]


def _stream_raw(url: str, path: str, body: dict[str, Any], secret: str | None) -> bytes:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    with httpx.stream(
        "POST", f"{url}{path}", json={**body, "stream": True}, headers=headers, timeout=120
    ) as resp:
        assert resp.status_code == 200, resp.read()
        return resp.read()


def _usage(fleet: Fleet, key_id: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{fleet.controller_url}/admin/v1/usage", params={"key_id": key_id}, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def _tokens_metric(url: str, key_name: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        s.labels["kind"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vpool_tokens_total" and s.labels["key"] == key_name
    }


def test_counted_tokens_are_the_engines_own_streamed_or_not(fleet: Fleet) -> None:
    secret, key_id = _make_key(fleet, "billing-exact", rpm=10_000, tpm=10_000_000)
    one, two = fleet.gateway_urls
    sdks = [OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0) for url in (one, two)]
    prompt_tokens = {"chat": 0, "completions": 0}

    chat = sdks[0].chat.completions.with_raw_response.create(**_sdk(CHAT))
    assert chat.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(chat.headers["x-ratelimit-remaining-tokens"]) < 10_000_000
    answer = chat.parse()
    assert answer.usage is not None and answer.usage.completion_tokens == MAX_TOKENS
    prompt_tokens["chat"] = answer.usage.prompt_tokens
    completion = sdks[1].completions.create(**_sdk(COMPLETION))
    assert completion.usage is not None and completion.usage.completion_tokens == MAX_TOKENS
    prompt_tokens["completions"] = completion.usage.prompt_tokens
    sent = {"chat": 1, "completions": 1}

    # streamed with include_usage: the final chunk is the engine's, as the client asked
    for sdk in sdks:
        chunks = list(
            sdk.chat.completions.create(**_sdk(CHAT), stream=True, stream_options={"include_usage": True})
        )
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == MAX_TOKENS
        assert all(c.usage is None for c in chunks[:-1])  # not the continuous usage vpool asked for
        sent["chat"] += 1

    # streamed without: what the worker sends unasked (ids, times and chunking aside)
    worker_url = next(
        w["url"] for w in fleet.admin_workers() if "tiny-chat" in w["models"] and w["state"] == "READY"
    )
    for path, body, route in (
        ("/v1/chat/completions", CHAT, "chat"),
        ("/v1/completions", COMPLETION, "completions"),
    ):
        through = _stream_raw(one, path, body, secret)
        direct = _stream_raw(worker_url, path, body, None)
        assert b'"usage"' not in through
        assert _shape(_events(through)) == _shape(_events(direct))
        sent[route] += 1

    expected = {
        "requests": sum(sent.values()),
        "prompt_tokens": sum(sent[r] * prompt_tokens[r] for r in sent),
        "completion_tokens": sum(sent.values()) * MAX_TOKENS,
        "errors": 0,
    }
    deadline = time.monotonic() + SETTLE_S
    while True:
        rows = _usage(fleet, key_id)
        counted = {k: sum(r[k] for r in rows) for k in expected}
        if counted == expected or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert counted == expected
    assert {r["model"] for r in rows} == {"tiny-chat"} and rows[0]["key_name"] == "billing-exact"
    # /metrics of each gateway: its own share, the sum being the engines' count
    metrics = [_tokens_metric(url, "billing-exact") for url in (one, two)]
    assert sum(m.get("completion", 0) for m in metrics) == expected["completion_tokens"]
    assert sum(m.get("prompt", 0) for m in metrics) == expected["prompt_tokens"]


def test_a_stream_left_early_is_counted_up_to_what_it_was_sent(fleet: Fleet) -> None:
    secret, key_id = _make_key(fleet, "billing-left")
    long = {**CHAT, "max_tokens": 400, "stream": True}
    received = 0
    with httpx.stream(
        "POST", f"{fleet.gateway_url}/v1/chat/completions", json=long,
        headers={"Authorization": f"Bearer {secret}"}, timeout=120,
    ) as resp:  # fmt: skip
        assert resp.status_code == 200
        for line in resp.iter_lines():
            # a chunk with text (the first one only says the role, with no text)
            if line.startswith("data: ") and '"content"' in line and '"content":""' not in line:
                received += 1
            if received >= 5:
                break
    deadline = time.monotonic() + SETTLE_S
    while not (rows := _usage(fleet, key_id)) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert len(rows) == 1 and rows[0]["requests"] == 1 and rows[0]["errors"] == 0
    # Counted to the last chunk relayed: at least what this client read, never the 400 asked.
    assert received <= rows[0]["completion_tokens"] < 400
    assert rows[0]["prompt_tokens"] > 0
