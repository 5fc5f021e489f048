"""What the SDK hides: SSE framing, status codes and error bodies, over raw HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

pytestmark = pytest.mark.integration

CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


def _assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def test_stream_is_server_sent_events_ending_with_done(http: httpx.Client) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(resp.iter_raw()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert raw.endswith("\n\n")
    assert events[-1] == "data: [DONE]"
    for event in events[:-1]:
        assert event.startswith("data: ")
        payload = json.loads(event[len("data: ") :])
        assert payload["object"] == "chat.completion.chunk"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 6


def test_completions_stream_is_framed_the_same(http: httpx.Client) -> None:
    body = {"model": "tiny-chat", "prompt": "a", "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as resp:
        raw = b"".join(resp.iter_raw()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_response_names_the_worker_that_served_it(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    assert resp.headers["x-vpool-worker"] in {"tiny-a", "tiny-b"}


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "tiny-chat", "messages": [', None),
        (b'["tiny-chat"]', None),
        (b'{"messages": []}', "model"),
        (b'{"model": 7, "messages": []}', "model"),
        (b'{"model": "", "messages": []}', "model"),
        (b'{"model": "tiny-chat", "messages": [], "stream": "yes"}', "stream"),
        (b'{"model": "tiny-chat", "messages": [], "stream_options": 3}', "stream_options"),
    ],
    ids=["malformed-json", "not-an-object", "missing-model", "non-string-model", "empty-model",
         "stream-not-bool", "stream-options-not-object"],
)  # fmt: skip
def test_bad_request_bodies_get_400_openai_errors(http: httpx.Client, raw: bytes, param: str | None) -> None:
    resp = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    error = _assert_openai_error(resp, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_is_404_naming_it(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"})
    error = _assert_openai_error(resp, 404)
    assert "gpt-17" in error["message"]
    assert error["code"] == "model_not_found"


def test_missing_and_wrong_keys_are_401(fleet) -> None:
    url = f"{fleet.gateway_url}/v1/chat/completions"
    _assert_openai_error(httpx.post(url, json=CHAT), 401)
    wrong = httpx.post(url, json=CHAT, headers={"Authorization": "Bearer sk-nope"})
    assert _assert_openai_error(wrong, 401)["code"] == "invalid_api_key"


def test_worker_validation_error_keeps_its_status_and_message(http: httpx.Client) -> None:
    resp = http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "x " * 3000, "max_tokens": 2})
    error = _assert_openai_error(resp, 400)
    assert "context" in error["message"].lower() or "length" in error["message"].lower()


def test_models_and_health_and_metrics(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert all(m["object"] == "model" for m in models["data"])
    health = http.get("/health").json()
    assert health["status"] == "ok"
    assert health["models"]["tiny-chat"] == 2
    http.post("/v1/chat/completions", json=CHAT)
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'vpool_requests_total{model="tiny-chat",route="chat",status="200"}' in metrics.text
    assert "vpool_request_duration_seconds_bucket" in metrics.text
