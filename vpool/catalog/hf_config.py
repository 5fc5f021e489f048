"""A local Hugging Face model directory as a catalog entry: its config.json read into the
catalog's architecture figures, and the size of its weights from the safetensors index (or
the weight files themselves) when they are there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vpool.catalog.entry import Architecture, CatalogEntry, ModelType, SlurmDefaults
from vpool.catalog.errors import PlanError

# Encoder-only model types: no KV cache, learned positions, an ungated MLP.
ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "nomic_bert"}
UNGATED = ENCODERS | {"gpt2", "gpt_neox", "gptj", "opt", "falcon", "bloom", "starcoder2", "phi"}
DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "fp16": "float16",
}


@dataclass
class LocalModel:
    entry: CatalogEntry
    checkpoint_bytes: int | None  # the weight files' size, None when there are none
    checkpoint_dtype: str  # what those files hold (before any quantization)


def read_model_dir(path: Path | str) -> LocalModel:
    """The model in `path`; PlanError when it holds no usable config.json."""
    root = Path(path).expanduser()
    config_path = root / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise PlanError(f"{root} is not a model directory: it has no config.json", param="model") from None
    except (OSError, ValueError) as exc:
        raise PlanError(f"{config_path} cannot be read as JSON: {exc}", param="model") from None
    if not isinstance(config, dict):
        raise PlanError(f"{config_path} does not hold a JSON object", param="model")
    try:
        architecture = architecture_from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{config_path} lacks what planning needs: {_reason(exc)}", param="model") from None
    checkpoint = checkpoint_bytes(root)
    if checkpoint and architecture.quantization is None:
        # The index gives bytes, not parameters: unquantized, they are one and the same count.
        per_param = 4 if architecture.torch_dtype == "float32" else 2
        architecture = architecture.model_copy(update={"parameters": checkpoint // per_param})
    max_len = architecture.max_position_embeddings
    entry = CatalogEntry(
        name=_safe_name(root.name),
        family=_safe_name(root.name),
        type=_model_type(config, architecture),
        model=str(root),
        max_model_len=max_len,
        slurm=SlurmDefaults(),
        architecture=architecture,
    )
    return LocalModel(entry=entry, checkpoint_bytes=checkpoint, checkpoint_dtype=architecture.torch_dtype)


def architecture_from_config(config: dict[str, Any]) -> Architecture:
    """The catalog's figures from a transformers config.json (text part for a VLM)."""
    outer = config
    if "text_config" in config and "hidden_size" not in config:
        config = {**config["text_config"], "architectures": outer.get("architectures")}
    model_type = str(config.get("model_type", outer.get("model_type", "")))
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = _first(config, "num_key_value_heads", "multi_query_group_num", default=heads)
    intermediate = _first(config, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * hidden)
    if model_type == "qwen":
        intermediate //= 2  # QWen-1 counts both MLP halves together
    dtype = DTYPES.get(
        str(config.get("torch_dtype") or config.get("dtype") or outer.get("torch_dtype")), "float32"
    )
    fields: dict[str, Any] = {
        "hf_architecture": (config.get("architectures") or [model_type or "unknown"])[0],
        "num_hidden_layers": _first(config, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": _first(config, "head_dim", "kv_channels", default=hidden // heads),
        "intermediate_size": intermediate,
        "vocab_size": _first(config, "vocab_size", "padded_vocab_size"),
        "max_position_embeddings": _first(
            config, "max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"
        ),
        "torch_dtype": dtype,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "gated_mlp": model_type not in UNGATED,
        "kv_cache": "none" if model_type in ENCODERS else "heads",
        "quantization": _quantization(outer.get("quantization_config") or config.get("quantization_config")),
        "parameters": 1,  # set below from the figures
    }
    if config.get("kv_lora_rank"):
        fields["kv_cache"] = "mla"
        fields["mla"] = {
            "q_lora_rank": config.get("q_lora_rank"),
            "kv_lora_rank": config["kv_lora_rank"],
            "qk_nope_head_dim": config["qk_nope_head_dim"],
            "qk_rope_head_dim": config["qk_rope_head_dim"],
            "v_head_dim": config["v_head_dim"],
        }
    experts = _first(config, "n_routed_experts", "num_local_experts", "num_experts", default=0)
    if experts > 1:
        fields["moe"] = {
            "num_experts": experts,
            "num_experts_per_tok": _first(config, "num_experts_per_tok", "top_k", default=2),
            "num_shared_experts": config.get("n_shared_experts") or 0,
            "moe_intermediate_size": config.get("moe_intermediate_size") or intermediate,
            "num_dense_layers": config.get("first_k_dense_replace") or 0,
        }
    estimate = Architecture.model_validate(fields)
    active = estimate.estimated_parameters(active=True) if estimate.moe else None
    return estimate.model_copy(
        update={"parameters": estimate.estimated_parameters(), "active_parameters": active}
    )


def checkpoint_bytes(root: Path) -> int | None:
    """The weights' size on disk: the safetensors index's total, else the weight files'."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            total = json.loads(index.read_text())["metadata"]["total_size"]
            if isinstance(total, int) and total > 0:
                return total
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(root.glob(pattern))
        if files:
            return sum(f.stat().st_size for f in files)
    return None


def _first(config: dict[str, Any], *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    if default is None:
        raise KeyError(keys[0])
    return default


def _quantization(config: Any) -> dict[str, Any] | None:
    if not isinstance(config, dict):
        return None
    method = str(config.get("quant_method", "")).lower()
    if method in ("gptq", "awq"):
        return {"method": method, "bits": config.get("bits", 4), "group_size": config.get("group_size")}
    if method == "fp8":
        block = config.get("weight_block_size") or [None]
        return {"method": "fp8", "bits": 8, "group_size": block[0]}
    raise ValueError(f"quantization {method or config!r} is not one the planner models (gptq, awq, fp8)")


def _model_type(config: dict[str, Any], architecture: Architecture) -> ModelType:
    name = architecture.hf_architecture
    if "Reward" in name or name.endswith("ForSequenceClassification"):
        return "Reward"
    if "vision_config" in config:
        return "VLM"
    if "ForCausalLM" in name or "LMHead" in name or "ForConditionalGeneration" in name:
        return "LLM"
    if architecture.kv_cache == "none" or name.endswith("Model"):
        return "Embedding"
    return "LLM"


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).lstrip("._-")
    return cleaned or "local-model"


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"no `{exc.args[0]}`"
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)
