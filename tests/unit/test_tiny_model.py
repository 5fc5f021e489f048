"""The locally made `tiny-chat` model: complete, chat-ready, made once, safe to race for."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from vpool.worker.tiny_model import MODEL_DIR_NAME, ensure_tiny_chat_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated once for the module: each generation costs seconds of CPU."""
    return ensure_tiny_chat_model(tmp_path_factory.mktemp("cache"))


def test_directory_holds_config_tokenizer_and_weights(model_dir: Path) -> None:
    assert model_dir.name == MODEL_DIR_NAME and model_dir.parent.name == "models"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 64  # vLLM CPU attention
    assert config["tie_word_embeddings"] is False
    assert 2000 <= config["vocab_size"] <= 4000


def test_chat_template_formats_turns_and_ends_with_assistant_marker(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "how are you"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\nhello<|end|>\n"
        "<|user|>\nhow are you<|end|>\n<|assistant|>\n"
    )
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[-2] == tokenizer.convert_tokens_to_ids("<|assistant|>")  # one token, not pieces
    config = json.loads((model_dir / "config.json").read_text())
    assert tokenizer.eos_token_id in config["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("</s>") in config["eos_token_id"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>"


def test_second_call_reuses_the_model_without_regenerating(model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert ensure_tiny_chat_model(model_dir.parent.parent) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_concurrent_processes_replace_leftovers_and_agree(model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / MODEL_DIR_NAME).mkdir(parents=True)
    (models / MODEL_DIR_NAME / "config.json").write_text("{}")  # a half-made model
    (models / f".{MODEL_DIR_NAME}-crashed").mkdir()  # a crashed builder's staging directory
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(ensure_tiny_chat_model, [tmp_path, tmp_path]))
    assert paths == [models / MODEL_DIR_NAME] * 2
    assert sorted(p.name for p in models.iterdir()) == [f".{MODEL_DIR_NAME}.lock", MODEL_DIR_NAME]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):  # deterministic too
        assert (paths[0] / name).read_bytes() == (model_dir / name).read_bytes(), name
