"""One model in the catalog: what it is, how vLLM serves it, what Slurm gives it, and the
architecture figures of its published config.json, so that planning needs no download."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelType = Literal["LLM", "VLM", "Embedding", "Reward"]
DType = Literal["float32", "float16", "bfloat16"]
BUILTIN_PREFIX = "builtin:"


class SlurmDefaults(BaseModel):
    """What a Slurm job for this model asks for unless the launch says otherwise."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None  # None: the cluster's default partition
    qos: str | None = None
    time: str = Field("08:00:00", pattern=r"^(\d+-)?\d{1,3}:\d{2}(:\d{2})?$")
    gpus_per_node: int = Field(1, ge=0)  # 0: a CPU job
    num_nodes: int = Field(1, ge=1)
    cpus_per_task: int = Field(16, ge=1)
    mem_per_node: str = Field("64G", pattern=r"^\d+[KMGT]?$")


class Quantization(BaseModel):
    """How the checkpoint's linear layers are stored; embeddings and the LM head stay 16-bit."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["gptq", "awq", "fp8"]
    bits: int = Field(ge=2, le=8)
    # GPTQ/AWQ: weights per scale; fp8: the side of its square scaling blocks.
    group_size: int | None = Field(None, gt=0)


class MoE(BaseModel):
    """Mixture of experts: every expert's weights live on the GPUs, `top_k` of them run."""

    model_config = ConfigDict(extra="forbid")

    num_experts: int = Field(gt=1)
    num_experts_per_tok: int = Field(ge=1)
    num_shared_experts: int = Field(0, ge=0)
    moe_intermediate_size: int = Field(gt=0)
    # The first layers may keep a dense MLP (DeepSeek's first_k_dense_replace).
    num_dense_layers: int = Field(0, ge=0)


class MLA(BaseModel):
    """Multi-head latent attention (DeepSeek V2/V3): the KV cache holds one compressed latent
    of kv_lora_rank plus the rotary part of the key per token and layer, not K and V per head."""

    model_config = ConfigDict(extra="forbid")

    q_lora_rank: int | None = Field(None, gt=0)
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)


class Architecture(BaseModel):
    """The figures of the model's config.json that decide its memory."""

    model_config = ConfigDict(extra="forbid")

    hf_architecture: str = Field(min_length=1)  # config.json `architectures[0]`
    parameters: int = Field(gt=0)  # all of them, every expert included
    active_parameters: int | None = Field(None, gt=0)  # per token, for MoE
    num_hidden_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    # The size of one MLP branch (gate, up, down). QWen-1 configs count the two halves
    # together: the catalog stores half their figure.
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    torch_dtype: DType
    tie_word_embeddings: bool = False
    gated_mlp: bool = True  # gate/up/down (Llama, Qwen, Mistral), else up/down (BERT)
    # What one token costs the KV cache: K and V for each KV head, MLA's latent, or nothing
    # (an encoder-only model keeps no cache).
    kv_cache: Literal["heads", "mla", "none"] = "heads"
    quantization: Quantization | None = None
    moe: MoE | None = None
    mla: MLA | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Architecture:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads {self.num_key_value_heads} must divide "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if (self.kv_cache == "mla") != (self.mla is not None):
            raise ValueError("kv_cache: mla goes with an `mla:` section, and only with it")
        if self.moe and self.moe.num_dense_layers > self.num_hidden_layers:
            raise ValueError("moe.num_dense_layers exceeds num_hidden_layers")
        return self

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def has_lm_head(self) -> bool:
        """A separate output matrix: untied, and not an encoder (whose head is a pooler)."""
        return not self.tie_word_embeddings and self.kv_cache != "none"

    def attention_parameters(self) -> int:
        """Per layer, biases and norms aside."""
        h = self.hidden_size
        if self.mla is not None:
            m, heads = self.mla, self.num_attention_heads
            q_in = m.q_lora_rank or h
            q = (h * m.q_lora_rank if m.q_lora_rank else 0) + q_in * heads * (
                m.qk_nope_head_dim + m.qk_rope_head_dim
            )
            kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * heads * (
                m.qk_nope_head_dim + m.v_head_dim
            )
            return q + kv + heads * m.v_head_dim * h
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        return 2 * h * q_width + 2 * h * kv_width

    def estimated_parameters(self, active: bool = False) -> int:
        """The count the architecture implies (biases and norms aside): a check on
        `parameters`, and the count for a local model without a weight index."""
        h, layers = self.hidden_size, self.num_hidden_layers
        branches = 3 if self.gated_mlp else 2
        dense_mlp = branches * h * self.intermediate_size
        if self.moe is None:
            mlp = layers * dense_mlp
        else:
            moe = self.moe
            experts = (moe.num_experts_per_tok if active else moe.num_experts) + moe.num_shared_experts
            moe_layer = experts * branches * h * moe.moe_intermediate_size + h * moe.num_experts
            mlp = moe.num_dense_layers * dense_mlp + (layers - moe.num_dense_layers) * moe_layer
        embeddings = self.embedding_parameters * (2 if self.has_lm_head else 1)
        if self.kv_cache == "none":
            embeddings += self.max_position_embeddings * h  # an encoder's learned positions
        return layers * self.attention_parameters() + mlp + embeddings

    def kv_bytes_per_token_and_layer(self, kv_heads_per_gpu: int, element_bytes: float) -> float:
        """One GPU's KV-cache cost of one token in one layer."""
        if self.kv_cache == "none":
            return 0.0
        if self.mla is not None:
            # vLLM keeps the whole latent on every tensor-parallel rank: it is not split.
            return (self.mla.kv_lora_rank + self.mla.qk_rope_head_dim) * element_bytes
        return 2 * kv_heads_per_gpu * self.head_dim * element_bytes


class CatalogEntry(BaseModel):
    """A model vpool knows how to launch: `vpool list NAME` shows every field."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    family: str = Field(min_length=1)
    variant: str | None = None
    type: ModelType = "LLM"
    model: str = Field(min_length=1, description="hub id, or builtin:<name>")
    max_model_len: int = Field(gt=0)  # the default context a launch serves
    engine_args: dict[str, Any] = Field(default_factory=dict)  # vLLM engine args, snake_case
    tool_call_parser: str | None = None  # vLLM's --tool-call-parser
    reasoning_parser: str | None = None  # vLLM's --reasoning-parser
    weights_dir: str | None = None  # explicit weights location; wins over the parent dir
    slurm: SlurmDefaults = Field(default_factory=SlurmDefaults)
    architecture: Architecture

    @model_validator(mode="after")
    def _length_within_the_model(self) -> CatalogEntry:
        native = self.architecture.max_position_embeddings
        if self.max_model_len > native:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings {native}"
            )
        return self

    @property
    def runner(self) -> Literal["generate", "pooling"]:
        return "pooling" if self.type in ("Embedding", "Reward") else "generate"

    @property
    def is_builtin(self) -> bool:
        return self.model.startswith(BUILTIN_PREFIX)

    @property
    def weights_dir_name(self) -> str:
        """The directory custom weights live in under a weights parent: FAMILY-VARIANT."""
        return f"{self.family}-{self.variant}" if self.variant else self.family

    def weights_path(self, weights_parent: Path | str | None = None) -> str:
        """Where a worker loads this model from: the entry's own `weights_dir`, else
        WEIGHTS_PARENT/FAMILY-VARIANT when a parent is given, else the hub id (or builtin
        name, which never lives under a parent)."""
        if self.weights_dir:
            return str(Path(self.weights_dir).expanduser())
        if self.is_builtin or weights_parent is None:
            return self.model
        return str(Path(weights_parent).expanduser() / self.weights_dir_name)

    def vllm_engine_args(self) -> dict[str, Any]:
        """The engine args a worker passes to vLLM: the defaults plus the parsers."""
        args = dict(self.engine_args)
        if self.tool_call_parser:
            args.setdefault("enable_auto_tool_choice", True)
            args.setdefault("tool_call_parser", self.tool_call_parser)
        if self.reasoning_parser:
            args.setdefault("reasoning_parser", self.reasoning_parser)
        return args

    def parameters_label(self) -> str:
        """`8.0B`, `671B (37B active)`, `22.7M`: what a table shows."""
        arch = self.architecture
        label = _count(arch.parameters)
        if arch.active_parameters:
            label += f" ({_count(arch.active_parameters)} active)"
        return label


def _count(n: int) -> str:
    if n >= 100e9:
        return f"{n / 1e9:.0f}B"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.1f}M"
