"""vLLM's whole API through one gateway URL, routed by `model`, on real engines.

Beyond chat, completions and embeddings: tokenize/detokenize on tiny-chat; pooling, score
and rerank on all-MiniLM-L6-v2 (served as `minilm`); the Responses API, whose stored
responses live in the memory of the engine that made them, so follow-ups must reach it
through any gateway; and `/v1/models` with each model's context length.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.conftest import API_KEY, Fleet

pytestmark = pytest.mark.integration


def test_tokenize_then_detokenize_gives_the_text_back(http: httpx.Client) -> None:
    text = "hello there, how are you today"
    tokens = http.post("/tokenize", json={"model": "tiny-chat", "prompt": text, "add_special_tokens": False})
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert len(ids) == tokens.json()["count"] > 1
    assert tokens.json()["max_model_len"] == 1024
    back = http.post("/detokenize", json={"model": "tiny-chat", "tokens": ids})
    assert back.status_code == 200, back.text
    assert back.json()["prompt"].strip() == text


def test_tokenize_a_conversation_applies_the_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "hello"}]
    plain = http.post(
        "/tokenize", json={"model": "tiny-chat", "prompt": "hello", "add_special_tokens": False}
    )
    chat = http.post("/tokenize", json={"model": "tiny-chat", "messages": messages})
    assert chat.status_code == 200, chat.text
    assert chat.json()["count"] > plain.json()["count"]  # the template's role markers


def test_pooling_gives_the_models_384_dimensional_vector(http: httpx.Client) -> None:
    resp = http.post("/pooling", json={"model": "minilm", "input": ["a cat", "a dog"]})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert all(len(d["data"]) == 384 for d in data)
    assert data[0]["data"] != data[1]["data"]


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
def test_score_ranks_a_paraphrase_above_an_unrelated_text(http: httpx.Client, path: str) -> None:
    body = {
        "model": "minilm",
        "text_1": "a cat sits on the mat",
        "text_2": ["a kitten on a rug", "stock prices fell"],
    }
    resp = http.post(path, json=body)
    assert resp.status_code == 200, resp.text
    scores = {d["index"]: d["score"] for d in resp.json()["data"]}
    assert scores[0] > scores[1]


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_puts_the_relevant_document_first(http: httpx.Client, path: str) -> None:
    documents = ["stock prices fell sharply", "the kitten sleeps on the sofa", "rain is expected tomorrow"]
    resp = http.post(path, json={"model": "minilm", "query": "where is the cat?", "documents": documents})
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == 3
    assert results[0]["index"] == 1
    assert results[0]["relevance_score"] >= results[1]["relevance_score"] >= results[2]["relevance_score"]


def test_a_route_the_model_does_not_serve_is_the_workers_404_in_openai_shape(http: httpx.Client) -> None:
    resp = http.post("/classify", json={"model": "minilm", "input": "a cat"})  # an embedding model
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}


def test_models_retrieve_gives_the_model_and_its_context_length(client: OpenAI, http: httpx.Client) -> None:
    model = client.models.retrieve("tiny-chat")
    assert model.id == "tiny-chat"
    assert model.model_extra is not None and model.model_extra["max_model_len"] == 1024
    listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert listed["tiny-chat"]["max_model_len"] == 1024
    assert listed["minilm"]["max_model_len"] == 256  # what vLLM settles for all-MiniLM-L6-v2
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_responses_create_answers_and_any_gateway_retrieves_the_stored_response(fleet: Fleet) -> None:
    first, second = (
        OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) for url in fleet.gateway_urls
    )
    with first, second:
        made = first.responses.create(model="tiny-chat", input="Hello there", max_output_tokens=6)
        assert made.object == "response"
        assert made.output_text
        for client in (first, second):  # the second never saw it: it has to find the worker
            again = client.responses.retrieve(made.id)
            assert again.id == made.id
            assert again.output_text == made.output_text


def test_a_streamed_response_is_stored_and_continued_with_previous_response_id(fleet: Fleet) -> None:
    first, second = (
        OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) for url in fleet.gateway_urls
    )
    with first, second:
        events = list(first.responses.create(model="tiny-chat", input="Hi", max_output_tokens=4, stream=True))
        assert events[0].type == "response.created"
        made = events[-1].response  # response.completed / incomplete
        # tiny-chat has two workers: only the one holding `made` knows it, whichever gateway asks.
        for _ in range(4):
            follow = second.responses.create(
                model="tiny-chat", input="And then?", max_output_tokens=4, previous_response_id=made.id
            )
            assert follow.previous_response_id == made.id


def test_an_unknown_response_id_is_404_in_openai_shape(http: httpx.Client) -> None:
    resp = http.get("/v1/responses/resp_does_not_exist")
    assert resp.status_code == 404
    assert resp.json()["error"]["param"] == "response_id"
