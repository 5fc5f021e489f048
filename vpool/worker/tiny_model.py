"""`tiny-chat`: a tiny Llama with random weights, made locally so nothing is downloaded.

It talks nonsense; it exists so that the whole serving path (tokenizer, chat template,
engine, streaming) runs anywhere in about a minute. The tokenizer is a small byte-level BPE
trained on text that ships with Python. Generation is deterministic (fixed seed) and atomic:
it is built in a temporary sibling directory and renamed into place, so a crash never leaves
a half-made model behind; a file lock makes racing processes build it once, not once each.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_DIR_NAME = "tiny-chat-v1"
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Content may be a string or a list of OpenAI content parts (only text parts are rendered).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is not none %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def ensure_tiny_chat_model(cache_dir: Path) -> Path:
    """The model directory under `cache_dir`, generated on first use; safe across processes."""
    target = Path(cache_dir) / "models" / MODEL_DIR_NAME
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{MODEL_DIR_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if _complete(target):  # another process made it while we waited
            return target
        for stale in target.parent.glob(f".{MODEL_DIR_NAME}-*"):  # left by a crashed builder
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-", dir=target.parent))
        try:
            _generate(staging)
            for path in staging.iterdir():  # mkdtemp and safetensors make files private
                os.chmod(path, 0o644)
            os.chmod(staging, 0o755)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover, never a good one
            try:
                os.rename(staging, target)
            except OSError:
                if not _complete(target):  # lost a race to a builder without the lock
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in REQUIRED_FILES)


def _corpus() -> list[str]:
    """English text that ships with every Python: module, class and function docstrings."""
    import argparse
    import asyncio
    import collections
    import json
    import pathlib
    import textwrap
    import unittest

    texts: list[str] = []
    for module in (argparse, asyncio, collections, json, pathlib, textwrap, unittest, os, shutil):
        texts.append(module.__doc__ or "")
        for name in dir(module):
            doc = getattr(getattr(module, name, None), "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return [t for t in texts if t.strip()]


def _generate(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|end|>",  # the chat template closes every turn with it
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "</s>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "</s>")]
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
    }
    _save_llama(
        out,
        TINY_CHAT_SIZE,
        vocab_size=len(tokenizer),
        ids=ids,
    )


@dataclass(frozen=True)
class LlamaSize:
    """A Llama's shape. head_dim (hidden / heads) must be 64 or more for vLLM's CPU attention."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_len: int


def _save_llama(out: Path, size: LlamaSize, vocab_size: int, ids: dict[str, Any]) -> int:
    """Random weights (seed 0) for a Llama of `size`, saved with its configs; the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_len,
        tie_word_embeddings=False,
        dtype="bfloat16",
        **ids,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    GenerationConfig(**ids).save_pretrained(out)
    # safetensors directly rather than save_pretrained: same file, no progress bar on stderr.
    weights = {name: t.to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() for t in weights.values())


# The catalog's tiny-chat entry states these figures (tests/unit/test_catalog.py checks it).
TINY_CHAT_SIZE = LlamaSize(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=4, max_len=2048)


def make_sized_chat_model(work: Path, hidden: int, layers: int, kv_heads: int, max_len: int) -> Path:
    """A random-weight Llama of the given size with the tiny model's tokenizer and template,
    for benchmarks whose prefill must cost something (benchmarks/prefix_routing.py)."""
    import json

    tiny = ensure_tiny_chat_model(work / "cache")
    out = work / f"model-h{hidden}-l{layers}"
    out.mkdir(parents=True, exist_ok=True)
    for path in tiny.iterdir():
        if path.name.startswith("tokenizer") or path.name in (
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            shutil.copy(path, out / path.name)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = max_len
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tiny_config = json.loads((tiny / "config.json").read_text())
    ids = {k: tiny_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    size = LlamaSize(
        hidden=hidden,
        intermediate=hidden * 8 // 3 // 64 * 64,
        layers=layers,
        heads=hidden // 64,
        kv_heads=kv_heads,
        max_len=max_len,
    )
    params = _save_llama(out, size, vocab_size=tiny_config["vocab_size"], ids=ids)
    print(f"  model: hidden {hidden}, {layers} layers, {kv_heads} KV heads, {params / 1e6:.1f} M parameters")
    return out


def token_counter(model_dir: Path) -> Callable[[str], int]:
    """Counts tokens as the model's own tokenizer does (benchmarks size prompts with it)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text).ids)
