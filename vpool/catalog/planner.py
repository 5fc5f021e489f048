"""How much GPU memory a model needs under vLLM, and the smallest layout that holds it.

The model, per GPU, in bytes (vLLM 0.32's own accounting, `vllm/v1/worker/gpu_worker.py`):

    weights   parameters x bytes each: 2 (16-bit); fp8 1 (+ a float32 scale per 128x128 block);
              GPTQ/AWQ 4-bit 0.5 + a 16-bit scale and a 4-bit zero per group. Embeddings and
              the LM head stay 16-bit. Split over the tensor-parallel (TP) ranks; the layers
              split over the pipeline (PP) stages, the embeddings on the first, the head on
              the last. MLA's low-rank down-projections are replicated on every TP rank.
    KV cache  concurrency x max_model_len (in whole 16-token blocks) x the stage's layers x
              2 x KV heads on the rank x head_dim x element bytes (KV heads are replicated
              when TP exceeds them); MLA: (kv_lora_rank + qk_rope_head_dim) x element bytes,
              whole on every rank.
    overhead  the peak activations of vLLM's profiling pass, the larger of the forward pass,
              max_num_batched_tokens x (6 hidden + q,k,v/TP + 3 intermediate/TP) x 2 bytes
              (MoE: + tokens x top_k x (hidden + 3 expert intermediate/TP) x 2), and the
              sampler's, max_num_seqs x vocab x 38.5 bytes (float32 logits, their sort for
              top-k/top-p, and copies: fitted to vLLM's "peak activation" of 4.76, 5.56 and
              7.38 GiB for vocabularies of 128k, 152k and 201k at 1024 sequences, llm-d's
              H100 measurements); + 0.15 GiB outside torch (0.65 GiB with more than one GPU:
              NCCL and all-reduce buffers) + 0.5 GiB of CUDA graphs (none with enforce_eager).

A layout fits when weights + KV cache + overhead <= the GPU's memory x gpu_memory_utilization:
the budget vLLM gives itself (CUDA graphs counted in it, as vLLM 0.32 does by default); the
CUDA context lives in what is left. The layout searched is the smallest power-of-two TP that
splits the attention heads (and the KV heads, and quantization groups) on one node, then
pipeline stages of a full node's TP when one node is not enough.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vpool.catalog.entry import CatalogEntry
from vpool.catalog.errors import PlanError
from vpool.catalog.gpus import GPU, GiB, GPUTable, auto_dtype, load_gpus
from vpool.catalog.hf_config import read_model_dir

DEFAULT_GPU = "A100-80GB"
DEFAULT_UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
BLOCK_TOKENS = 16  # vLLM's KV-cache block on CUDA
NON_TORCH_BYTES = int(0.15 * GiB)
NCCL_BYTES = int(0.5 * GiB)
CUDA_GRAPH_BYTES = int(0.5 * GiB)
SAMPLER_BYTES_PER_LOGIT = 38.5
QUANTIZATIONS = ("none", "fp8", "gptq", "awq")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class Plan(BaseModel):
    """The planner's answer; every GiB figure is per GPU."""

    model: str
    gpu: str
    gpu_memory_gib: float  # the device's memory as planned with
    gpu_memory_utilization: float
    budget_gib: float  # gpu_memory_gib x gpu_memory_utilization
    dtype: str
    quantization: str | None
    kv_cache_dtype: str
    max_model_len: int
    concurrency: int  # sequences of max_model_len the KV cache holds at once
    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    total_gib: float
    # What vLLM would give the KV cache at this layout: budget - weights - overhead.
    kv_cache_available_gib: float
    tensor_parallel_size: int
    pipeline_parallel_size: int
    num_gpus: int
    num_nodes: int
    gpus_per_node: int
    fits: bool
    # The longest context that fits at this TP/PP with `concurrency` sequences at once
    # (a multiple of the 16-token block, at most the model's own maximum; 0: none fits).
    max_model_len_that_fits: int
    kv_cache_bytes_per_token: int  # on one GPU, all its layers
    max_num_batched_tokens: int
    max_num_seqs: int
    notes: list[str]

    def summary(self) -> str:
        """One sentence: where it fits, or why not and what would."""
        layout = f"TP {self.tensor_parallel_size}"
        if self.pipeline_parallel_size > 1:
            layout += f" x PP {self.pipeline_parallel_size}"
        where = f"{self.num_gpus} x {self.gpu}"
        if self.num_nodes > 1:
            where += f" on {self.num_nodes} nodes"
        figures = f"{self.total_gib:.1f} GiB of {self.budget_gib:.1f} GiB per GPU"
        if self.fits:
            return f"{self.model} fits on {where} ({layout}): {figures}."
        if self.max_model_len_that_fits:
            longest = f"the longest max_model_len that fits is {self.max_model_len_that_fits}"
            if self.concurrency > 1:
                longest += f" at {self.concurrency} sequences"
        else:
            longest = f"weights and overhead alone take {self.weights_gib + self.overhead_gib:.1f} GiB"
        return f"{self.model} does not fit on {where} ({layout}): {figures} needed; {longest}."


@dataclass
class _Model:
    """What the arithmetic needs of a catalog entry or a local directory."""

    entry: CatalogEntry
    checkpoint_bytes: int | None = None  # a local directory's weight files


def plan(
    target: CatalogEntry | Path | str,
    *,
    gpu: str | GPU | None = None,
    max_model_len: int | None = None,
    concurrency: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
    gpu_memory_utilization: float | None = None,
    tensor_parallel_size: int | None = None,
    pipeline_parallel_size: int | None = None,
    gpus_per_node: int = 8,
    max_nodes: int = 16,
    gpus: GPUTable | None = None,
) -> Plan:
    """Plan `target` (a catalog entry, or a local Hugging Face model directory) on `gpu`.

    Unset options come from the entry's engine_args, else vLLM's defaults: max_model_len the
    entry's, `quantization` the checkpoint's own ("none" to plan it unquantized), kv_cache_dtype
    "auto" (the model's dtype; "fp8" halves it), gpu_memory_utilization 0.9. Given TP and/or PP
    sizes are planned as they are; the others are searched, TP up to `gpus_per_node` and PP up
    to `max_nodes` nodes. Raises PlanError (or UnknownGPU) when no plan can be made.
    """
    model = _model(target)
    entry, arch = model.entry, model.entry.architecture
    args = entry.engine_args
    device = gpu if isinstance(gpu, GPU) else (gpus or load_gpus()).get(gpu or DEFAULT_GPU)
    if concurrency < 1:
        raise PlanError("concurrency must be 1 or more", param="concurrency")
    length = max_model_len or args.get("max_model_len") or entry.max_model_len
    if length > arch.max_position_embeddings:
        raise PlanError(
            f"max_model_len {length} exceeds {entry.name}'s maximum, {arch.max_position_embeddings} tokens",
            param="max_model_len",
        )
    utilization = gpu_memory_utilization or args.get("gpu_memory_utilization") or DEFAULT_UTILIZATION
    if not 0 < utilization <= 1:
        raise PlanError("gpu_memory_utilization must be in (0, 1]", param="gpu_memory_utilization")
    notes: list[str] = []
    run_dtype = _dtype(dtype, device, arch.torch_dtype, notes)
    quant = _quantization(quantization or args.get("quantization"), entry, notes)
    _precision_notes(device, quant, notes)
    kv_dtype = kv_cache_dtype or args.get("kv_cache_dtype") or "auto"
    kv_element = _kv_element_bytes(kv_dtype, run_dtype)
    calc = _Calculator(model, device, run_dtype, quant, kv_element, utilization, args)

    tp_options = _tp_sizes(entry, quant, gpus_per_node, tensor_parallel_size)
    layouts = _layouts(tp_options, pipeline_parallel_size, arch.num_hidden_layers, gpus_per_node, max_nodes)
    chosen = next((lay for lay in layouts if calc.fits(lay, length, concurrency)), None)
    if chosen is None:
        # Nothing holds the request: show the smallest layout that holds anything at all.
        chosen = next((lay for lay in layouts if calc.longest(lay, concurrency) > 0), layouts[-1])
        widest = layouts[-1]
        notes.append(f"no layout up to TP {widest[0]} x PP {widest[1]} holds it")
    tp, pp = chosen
    if arch.kv_cache == "heads" and tp > arch.num_key_value_heads:
        notes.append(
            f"TP {tp} exceeds the {arch.num_key_value_heads} KV heads: each rank keeps a copy of one"
        )
    if arch.kv_cache == "mla" and tp > 1:
        notes.append("MLA: every TP rank holds the whole latent KV cache")
    weights, kv, overhead = (
        calc.weights(tp, pp),
        calc.kv_cache(tp, pp, length, concurrency),
        calc.overhead(tp, pp),
    )
    total = weights + kv + overhead
    return Plan(
        model=entry.name,
        gpu=device.name,
        gpu_memory_gib=device.usable_gib,
        gpu_memory_utilization=utilization,
        budget_gib=_gib(calc.budget),
        dtype=run_dtype,
        quantization=quant,
        kv_cache_dtype=run_dtype if kv_dtype == "auto" else kv_dtype,
        max_model_len=length,
        concurrency=concurrency,
        weights_gib=_gib(weights),
        kv_cache_gib=_gib(kv),
        overhead_gib=_gib(overhead),
        total_gib=_gib(total),
        kv_cache_available_gib=_gib(calc.kv_available(tp, pp)),
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        num_gpus=tp * pp,
        num_nodes=math.ceil(tp * pp / gpus_per_node),
        gpus_per_node=gpus_per_node,
        fits=calc.fits(chosen, length, concurrency),
        max_model_len_that_fits=calc.longest(chosen, concurrency),
        kv_cache_bytes_per_token=int(calc.kv_per_token(tp, pp)),
        max_num_batched_tokens=calc.batched_tokens,
        max_num_seqs=calc.max_seqs,
        notes=notes,
    )


class _Calculator:
    """The byte arithmetic of the module docstring for one model, GPU and precision."""

    def __init__(
        self,
        model: _Model,
        gpu: GPU,
        dtype: str,
        quantization: str | None,
        kv_element: float,
        utilization: float,
        args: dict[str, Any],
    ) -> None:
        self.entry, self.arch = model.entry, model.entry.architecture
        self.checkpoint_bytes = model.checkpoint_bytes
        self.dtype_bytes = DTYPE_BYTES[dtype]
        self.quantization = quantization
        self.kv_element = kv_element
        self.budget = int(gpu.usable_gib * GiB * utilization)
        self.eager = bool(args.get("enforce_eager"))
        self.kv_pool = args.get("kv_cache_memory_bytes")  # a fixed KV cache instead of the rest
        default_tokens, default_seqs = _scheduler_defaults(gpu)
        self.batched_tokens = int(args.get("max_num_batched_tokens") or default_tokens)
        self.max_seqs = int(args.get("max_num_seqs") or default_seqs)

    def weights(self, tp: int, pp: int) -> float:
        arch = self.arch
        head = arch.embedding_parameters if arch.has_lm_head else 0
        embed = arch.embedding_parameters
        body = max(arch.parameters - embed - head, 0)
        edge_bytes = 2 if self.quantization else self.dtype_bytes  # embeddings and LM head
        total = self._weight_bytes(body, embed, head, edge_bytes)
        layers = arch.num_hidden_layers
        stage_layers = math.ceil(layers / pp)
        body_bytes = total - (embed + head) * edge_bytes
        edges = (embed + head) if pp == 1 else max(embed, head)
        per_gpu = (body_bytes * stage_layers / layers + edges * edge_bytes) / tp
        return per_gpu + self._replicated(tp) * stage_layers

    def _weight_bytes(self, body: int, embed: int, head: int, edge_bytes: int) -> float:
        if self.checkpoint_bytes and not self.quantization:
            # A local checkpoint's own size, in the dtype it runs in.
            ratio = self.dtype_bytes / DTYPE_BYTES[self.arch.torch_dtype]
            return self.checkpoint_bytes * ratio
        if self.checkpoint_bytes and self.quantization == _native(self.entry):
            return float(self.checkpoint_bytes)
        return body * self._body_bytes_per_param() + (embed + head) * edge_bytes

    def _body_bytes_per_param(self) -> float:
        quant = self.arch.quantization
        if self.quantization is None:
            return self.dtype_bytes
        if self.quantization == "fp8":
            block = quant.group_size if quant and quant.method == "fp8" and quant.group_size else 128
            return 1 + 4 / (block * block)
        bits = quant.bits if quant and quant.method == self.quantization else 4
        group = quant.group_size if quant and quant.method == self.quantization and quant.group_size else 128
        return bits / 8 + (16 + bits) / (8 * group)

    def _replicated(self, tp: int) -> float:
        """Per layer, what each TP rank holds beyond its share."""
        arch, m = self.arch, self.arch.mla
        if tp == 1:
            return 0.0
        if m is not None:
            latent = arch.hidden_size * ((m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim)
            return latent * self._body_bytes_per_param() * (1 - 1 / tp)
        kv = arch.num_key_value_heads
        if arch.kv_cache == "heads" and tp > kv:
            # K and V projections of one head on every rank, instead of kv/tp of one.
            kv_projections = 2 * arch.hidden_size * arch.head_dim * (1 - kv / tp)
            return kv_projections * self._body_bytes_per_param()
        return 0.0

    def kv_per_token(self, tp: int, pp: int) -> float:
        arch = self.arch
        kv_heads = max(1, arch.num_key_value_heads // tp)
        layers = math.ceil(arch.num_hidden_layers / pp)
        return arch.kv_bytes_per_token_and_layer(kv_heads, self.kv_element) * layers

    def kv_cache(self, tp: int, pp: int, length: int, concurrency: int) -> float:
        tokens = math.ceil(length / BLOCK_TOKENS) * BLOCK_TOKENS * concurrency
        return tokens * self.kv_per_token(tp, pp)

    def overhead(self, tp: int, pp: int) -> float:
        arch, act = self.arch, self.dtype_bytes
        h = arch.hidden_size
        qkv = (arch.num_attention_heads + 2 * arch.num_key_value_heads) * arch.head_dim / tp
        forward = self.batched_tokens * act * (6 * h + qkv + 3 * arch.intermediate_size / tp)
        if arch.moe is not None:
            moe = arch.moe
            forward += (
                self.batched_tokens * moe.num_experts_per_tok * act * (h + 3 * moe.moe_intermediate_size / tp)
            )
        sampler = (
            self.max_seqs * arch.vocab_size * SAMPLER_BYTES_PER_LOGIT
            if self.entry.runner == "generate"
            else 0
        )
        fixed = NON_TORCH_BYTES + (NCCL_BYTES if tp * pp > 1 else 0) + (0 if self.eager else CUDA_GRAPH_BYTES)
        return max(forward, sampler) + fixed

    def fits(self, layout: tuple[int, int], length: int, concurrency: int) -> bool:
        tp, pp = layout
        needed = self.kv_cache(tp, pp, length, concurrency)
        return self._holds_fixed(tp, pp) and needed <= self.kv_available(tp, pp)

    def longest(self, layout: tuple[int, int], concurrency: int) -> int:
        tp, pp = layout
        if not self._holds_fixed(tp, pp):
            return 0
        per_block = self.kv_per_token(tp, pp) * BLOCK_TOKENS * concurrency
        native = self.arch.max_position_embeddings
        if per_block == 0:
            return native
        return min(int(self.kv_available(tp, pp) // per_block) * BLOCK_TOKENS, native)

    def kv_available(self, tp: int, pp: int) -> float:
        """What the KV cache gets: the rest of the budget, or the fixed pool asked for."""
        room = max(self.budget - self._fixed(tp, pp), 0)
        return room if self.kv_pool is None else min(room, self.kv_pool)

    def _holds_fixed(self, tp: int, pp: int) -> bool:
        return self._fixed(tp, pp) + (self.kv_pool or 0) <= self.budget

    def _fixed(self, tp: int, pp: int) -> float:
        return self.weights(tp, pp) + self.overhead(tp, pp)


def _model(target: CatalogEntry | Path | str) -> _Model:
    if isinstance(target, CatalogEntry):
        return _Model(target)
    path = Path(target).expanduser()
    if not path.is_dir():
        reason = "is not a directory" if path.exists() else "does not exist"
        raise PlanError(f"No model directory at {path}: it {reason}", param="model")
    local = read_model_dir(path)
    return _Model(local.entry, local.checkpoint_bytes)


def _scheduler_defaults(gpu: GPU) -> tuple[int, int]:
    """vLLM 0.32's max_num_batched_tokens and max_num_seqs for its OpenAI server (what a
    vpool worker runs), which size the profiling pass (`engine/arg_utils.py`)."""
    if gpu.usable_gib >= 160:
        return 16384, 1024
    if gpu.usable_gib >= 70 and "A100" not in gpu.name:
        return 8192, 1024
    return 2048, 256


def _dtype(requested: str, gpu: GPU, native: str, notes: list[str]) -> str:
    if requested == "auto":
        chosen = auto_dtype(gpu, native)
        if native == "bfloat16" and chosen == "float16":
            notes.append(f"float16, not the checkpoint's bfloat16: {gpu.name} has no bfloat16")
        return chosen
    if requested not in DTYPE_BYTES:
        raise PlanError(f"dtype {requested!r}: choose auto, bfloat16, float16 or float32", param="dtype")
    if requested == "bfloat16" and not gpu.bf16:
        raise PlanError(f"{gpu.name} has no bfloat16: use --dtype float16 (or auto)", param="dtype")
    return requested


def _native(entry: CatalogEntry) -> str | None:
    quant = entry.architecture.quantization
    return quant.method if quant else None


def _quantization(requested: str | None, entry: CatalogEntry, notes: list[str]) -> str | None:
    native = _native(entry)
    if requested is None:
        return native
    requested = requested.lower()
    if requested not in QUANTIZATIONS:
        raise PlanError(
            f"quantization {requested!r}: choose one of {', '.join(QUANTIZATIONS)}", param="quantization"
        )
    if requested == "none":
        requested = None
    if native and requested != native:
        raise PlanError(
            f"{entry.name} is a {native} checkpoint: it runs as {native}, "
            f"not as {requested or 'unquantized'}",
            param="quantization",
        )
    if requested in ("gptq", "awq") and not native:
        notes.append(
            f"planned as a {requested} 4-bit checkpoint of the model, which vLLM does not make on the fly"
        )
    return requested


def _precision_notes(gpu: GPU, quantization: str | None, notes: list[str]) -> None:
    if quantization == "fp8" and not gpu.fp8:
        notes.append(f"{gpu.name} has no fp8 compute: vLLM runs the fp8 weights weight-only (Marlin kernels)")


def _kv_element_bytes(kv_cache_dtype: str, run_dtype: str) -> float:
    if kv_cache_dtype == "auto":
        return DTYPE_BYTES[run_dtype]
    if kv_cache_dtype.startswith("fp8"):
        return 1
    if kv_cache_dtype in DTYPE_BYTES:
        return DTYPE_BYTES[kv_cache_dtype]
    raise PlanError(
        f"kv_cache_dtype {kv_cache_dtype!r}: choose auto, fp8 (fp8_e4m3, fp8_e5m2), bfloat16 or float16",
        param="kv_cache_dtype",
    )


def _tp_sizes(
    entry: CatalogEntry, quantization: str | None, gpus_per_node: int, fixed: int | None
) -> list[int]:
    """The tensor-parallel sizes the model splits into: powers of two (or `fixed`) dividing
    the attention heads, dividing or divisible by the KV heads, and leaving whole
    quantization groups on each rank."""
    candidates = [fixed] if fixed else [2**i for i in range(8) if 2**i <= max(gpus_per_node, 1)]
    valid = [tp for tp in candidates if _split_problem(entry, quantization, tp) is None]
    if fixed and not valid:
        raise PlanError(
            f"{entry.name} cannot run at TP {fixed}: {_split_problem(entry, quantization, fixed)}",
            param="tensor_parallel_size",
        )
    if not valid:
        raise PlanError(
            f"{entry.name} splits into no TP size up to {gpus_per_node}", param="tensor_parallel_size"
        )
    return valid


def _split_problem(entry: CatalogEntry, quantization: str | None, tp: int) -> str | None:
    arch = entry.architecture
    if tp < 1:
        return "TP must be 1 or more"
    if arch.num_attention_heads % tp:
        return f"its {arch.num_attention_heads} attention heads do not split into {tp}"
    kv = arch.num_key_value_heads
    if arch.kv_cache == "heads" and kv % tp and tp % kv:
        return f"its {kv} KV heads neither split into {tp} nor divide it"
    quant = arch.quantization
    group = quant.group_size if quant and quant.method == quantization else (128 if quantization else None)
    if group:
        sizes = [arch.intermediate_size] + ([arch.moe.moe_intermediate_size] if arch.moe else [])
        for size in sizes:
            if size % tp or (size // tp) % group:
                return f"an MLP of {size} over {tp} ranks leaves partial {quantization} groups of {group}"
    return None


def _layouts(
    tp_options: list[int], fixed_pp: int | None, layers: int, gpus_per_node: int, max_nodes: int
) -> list[tuple[int, int]]:
    """In the order tried: TP alone on one node, smallest first; then pipeline stages of the
    largest TP, one more at a time, up to `max_nodes` nodes."""
    if fixed_pp:
        if fixed_pp > layers:
            raise PlanError(
                f"PP {fixed_pp} exceeds the model's {layers} layers", param="pipeline_parallel_size"
            )
        return [(tp, fixed_pp) for tp in tp_options]
    layouts = [(tp, 1) for tp in tp_options]
    widest = tp_options[-1]
    pp = 2
    while pp <= layers and math.ceil(widest * pp / max(gpus_per_node, 1)) <= max_nodes:
        layouts.append((widest, pp))
        pp += 1
    return layouts


def _gib(value: float) -> float:
    return round(value / GiB, 3)
