"""The memory planner: its figures for known models against what vLLM printed, the layouts it
picks, the longest context it promises, and local model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vpool.catalog.catalog import CatalogEntry, load_catalog
from vpool.catalog.errors import PlanError, UnknownGPU
from vpool.catalog.planner import BLOCK_TOKENS, Plan, plan

GiB = 1024**3


@pytest.fixture(scope="module")
def catalog_entry() -> dict[str, CatalogEntry]:
    return {entry.name: entry for entry in load_catalog(environ={})}


def planned(entries: dict[str, CatalogEntry], name: str, **options: object) -> Plan:
    return plan(entries[name], **options)  # type: ignore[arg-type]


# Planned against published: (what, model, plan options, the Plan field, published GiB, tolerance,
# where it was published). The README's table holds the same rows.
PUBLISHED = [
    (
        "weights, fp16, TP 1",
        "Llama-2-7b-chat-hf",
        {"gpu": "MI300X"},
        "weights_gib",
        12.5523,
        0.005,
        "vLLM 0.6.3 'Loading model weights took 12.5523 GB' (llm-tracker.info MI300X tests)",
    ),
    (
        "weights per GPU, fp16, TP 8",
        "Llama-2-7b-chat-hf",
        {"gpu": "MI300X", "tensor_parallel_size": 8},
        "weights_gib",
        1.5874,
        0.02,
        "the same log at TP 8",
    ),
    (
        "KV cache, MI300X, utilization 0.9",
        "Llama-2-7b-chat-hf",
        {"gpu": "MI300X"},
        "kv_cache_available_gib",
        20186 * BLOCK_TOKENS * 512 * 1024 / GiB,  # '# GPU blocks: 20186' x 16 tokens x 512 KiB
        0.01,
        "the same log",
    ),
    (
        "weights, bf16",
        "Meta-Llama-3.1-8B-Instruct",
        {"gpu": "H100-80GB"},
        "weights_gib",
        14.99,
        0.005,
        "llm-d-benchmark, config_explorer/empirical-vllm-memory-results.md (vLLM V1, H100)",
    ),
    (
        "KV cache, H100, max_model_len 16000",
        "Meta-Llama-3.1-8B-Instruct",
        {"gpu": "H100-80GB", "max_model_len": 16000},
        "kv_cache_available_gib",
        51.38,
        0.02,
        "llm-d-benchmark (as above)",
    ),
    (
        "weights per GPU, fp8, TP 2 (Llama-3.3-70B-FP8)",
        "Meta-Llama-3.1-70B-Instruct",
        {"gpu": "H100-80GB", "quantization": "fp8", "tensor_parallel_size": 2, "max_model_len": 16000},
        "weights_gib",
        33.88,
        0.01,
        "llm-d-benchmark (as above); Llama-3.3-70B has Llama-3.1-70B's architecture",
    ),
    (
        "KV cache, fp8, TP 2, H100",
        "Meta-Llama-3.1-70B-Instruct",
        {"gpu": "H100-80GB", "quantization": "fp8", "tensor_parallel_size": 2, "max_model_len": 16000},
        "kv_cache_available_gib",
        32.0,
        0.02,
        "llm-d-benchmark (as above)",
    ),
    (
        "weights, fp8, TP 1",
        "Meta-Llama-3.1-70B-Instruct",
        {"gpu": "H100-80GB", "quantization": "fp8", "tensor_parallel_size": 1, "pipeline_parallel_size": 1},
        "weights_gib",
        67.72,
        0.01,
        "llm-d-benchmark (as above)",
    ),
    (
        "weights per GPU, fp8, TP 8",
        "DeepSeek-R1",
        {"gpu": "H200"},
        "weights_gib",
        79.41,
        0.01,
        "HabanaAI/vllm-fork#809: 'took 79.41 GiB of device memory' per HPU at TP 8",
    ),
]


@pytest.mark.parametrize(
    ("what", "model", "options", "field", "published", "tolerance", "source"),
    PUBLISHED,
    ids=[f"{row[1]}: {row[0]}" for row in PUBLISHED],
)
def test_planned_figures_match_what_vllm_reported(
    catalog_entry: dict[str, CatalogEntry],
    what: str,
    model: str,
    options: dict[str, object],
    field: str,
    published: float,
    tolerance: float,
    source: str,
) -> None:
    figure = getattr(planned(catalog_entry, model, **options), field)
    assert figure == pytest.approx(published, rel=tolerance), f"{what}: {source}"


def test_llama3_8b_in_bf16_fits_one_a100_80gb(catalog_entry: dict[str, CatalogEntry]) -> None:
    p = planned(catalog_entry, "Meta-Llama-3-8B-Instruct", gpu="A100-80GB")
    assert p.fits
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.num_gpus) == (1, 1, 1)
    assert p.dtype == "bfloat16"
    assert p.total_gib == pytest.approx(p.weights_gib + p.kv_cache_gib + p.overhead_gib, abs=0.01)
    assert p.summary().startswith("Meta-Llama-3-8B-Instruct fits on 1 x A100-80GB (TP 1): ")


def test_kv_cache_per_token_is_what_the_architecture_implies(catalog_entry: dict[str, CatalogEntry]) -> None:
    llama3 = planned(catalog_entry, "Meta-Llama-3-8B-Instruct")
    assert llama3.kv_cache_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    one = {"tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    llama70 = planned(catalog_entry, "Meta-Llama-3.1-70B-Instruct", gpu="H200", max_model_len=8192, **one)
    # Hugging Face's Llama 3.1 post: 39.06 GiB of KV cache for 128k (128,000) tokens of the 70B.
    assert llama70.kv_cache_bytes_per_token * 128_000 / GiB == pytest.approx(39.06, abs=0.01)
    r1 = planned(catalog_entry, "DeepSeek-R1", gpu="H200")
    assert r1.kv_cache_bytes_per_token == 61 * (512 + 64) * 2  # MLA: the latent, on every TP rank


def test_fp8_kv_cache_halves_it(catalog_entry: dict[str, CatalogEntry]) -> None:
    options = {"gpu": "H100-80GB", "max_model_len": 32768, "concurrency": 8, "tensor_parallel_size": 4}
    bf16 = planned(catalog_entry, "Meta-Llama-3.1-70B-Instruct", **options)
    fp8 = planned(catalog_entry, "Meta-Llama-3.1-70B-Instruct", kv_cache_dtype="fp8", **options)
    assert fp8.kv_cache_gib == pytest.approx(bf16.kv_cache_gib / 2)
    assert fp8.kv_cache_dtype == "fp8" and bf16.kv_cache_dtype == "bfloat16"


def test_llama3_70b_needs_tp4_on_80gb_for_16_sequences_of_8192(
    catalog_entry: dict[str, CatalogEntry],
) -> None:
    for gpu in ("A100-80GB", "H100-80GB"):
        p = planned(catalog_entry, "Meta-Llama-3-70B-Instruct", gpu=gpu, max_model_len=8192, concurrency=16)
        assert p.fits
        assert (p.tensor_parallel_size, p.pipeline_parallel_size) == (4, 1), gpu
    # One sequence needs two A100s at least: 131 GiB of bf16 weights (vLLM issue #5711).
    one = planned(catalog_entry, "Meta-Llama-3-70B-Instruct", gpu="A100-80GB")
    assert one.tensor_parallel_size == 2


def test_the_int4_72b_fits_on_fewer_gpus_than_the_16bit_one(catalog_entry: dict[str, CatalogEntry]) -> None:
    full = planned(catalog_entry, "Qwen-72B", gpu="A100-80GB")
    int4 = planned(catalog_entry, "Qwen-72B-Chat-Int4", gpu="A100-80GB")
    assert full.fits and int4.fits
    assert int4.num_gpus < full.num_gpus
    assert int4.quantization == "gptq" and int4.dtype == "float16"
    assert int4.weights_gib * int4.num_gpus < 0.3 * full.weights_gib * full.num_gpus


def test_deepseek_r1_needs_pipeline_stages_across_nodes_on_80gb_gpus(
    catalog_entry: dict[str, CatalogEntry],
) -> None:
    # Ray's DeepSeek-R1 guide: two nodes of 8 x H100 80GB, TP 8 x PP 2, max_model_len 16384.
    p = planned(
        catalog_entry, "DeepSeek-R1", gpu="H100-80GB", max_model_len=16384, gpu_memory_utilization=0.92
    )
    assert p.fits
    assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.num_nodes) == (8, 2, 2)
    assert "on 2 nodes (TP 8 x PP 2)" in p.summary()
    assert p.quantization == "fp8"
    on_h200 = planned(catalog_entry, "DeepSeek-R1", gpu="H200")
    assert (on_h200.tensor_parallel_size, on_h200.pipeline_parallel_size, on_h200.num_nodes) == (8, 1, 1)


def test_max_model_len_that_fits_is_the_largest_that_does(catalog_entry: dict[str, CatalogEntry]) -> None:
    layout = {"gpu": "A10G", "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "concurrency": 2}
    too_long = planned(catalog_entry, "Meta-Llama-3.1-8B-Instruct", max_model_len=131072, **layout)
    assert not too_long.fits
    longest = too_long.max_model_len_that_fits
    assert 0 < longest < 131072 and longest % BLOCK_TOKENS == 0
    assert planned(catalog_entry, "Meta-Llama-3.1-8B-Instruct", max_model_len=longest, **layout).fits
    one_block_more = longest + BLOCK_TOKENS
    assert not planned(
        catalog_entry, "Meta-Llama-3.1-8B-Instruct", max_model_len=one_block_more, **layout
    ).fits
    assert too_long.summary().endswith(f"the longest max_model_len that fits is {longest} at 2 sequences.")


def test_the_longest_length_stops_at_the_models_own_maximum(catalog_entry: dict[str, CatalogEntry]) -> None:
    p = planned(catalog_entry, "Llama-2-7b-chat-hf", gpu="H200")
    assert p.max_model_len_that_fits == 4096


def test_a_model_too_big_for_any_layout_says_so(catalog_entry: dict[str, CatalogEntry]) -> None:
    p = planned(catalog_entry, "DeepSeek-R1", gpu="T4", tensor_parallel_size=8, pipeline_parallel_size=2)
    assert not p.fits and p.max_model_len_that_fits == 0
    assert p.summary().endswith(f"weights and overhead alone take {p.weights_gib + p.overhead_gib:.1f} GiB.")


def test_tensor_parallelism_must_split_the_heads(catalog_entry: dict[str, CatalogEntry]) -> None:
    # llama-30b has 52 attention heads: TP 8 is impossible, so a small GPU gets TP 4 and stages.
    with pytest.raises(PlanError, match="52 attention heads do not split into 8"):
        planned(catalog_entry, "llama-30b", tensor_parallel_size=8)
    p = planned(catalog_entry, "llama-30b", gpu="T4")
    assert p.fits and p.tensor_parallel_size == 4 and p.pipeline_parallel_size > 1


def test_gptq_groups_must_stay_whole_on_each_rank(catalog_entry: dict[str, CatalogEntry]) -> None:
    # Qwen-14B's MLP is 13696 wide: over 2 ranks, 6848 is not a multiple of the group of 128.
    with pytest.raises(PlanError, match="partial gptq groups"):
        planned(catalog_entry, "Qwen-14B-Chat-Int4", tensor_parallel_size=2)


def test_tp_past_the_kv_heads_replicates_them(catalog_entry: dict[str, CatalogEntry]) -> None:
    p = planned(catalog_entry, "Qwen2.5-7B-Instruct", tensor_parallel_size=4)  # 4 KV heads: 1 each
    assert p.kv_cache_bytes_per_token == 28 * 2 * 1 * 128 * 2
    with pytest.raises(PlanError, match="attention heads do not split into 8"):
        planned(catalog_entry, "Qwen2.5-7B-Instruct", tensor_parallel_size=8)  # 28 heads


def test_auto_dtype_falls_back_to_float16_where_bf16_is_missing(
    catalog_entry: dict[str, CatalogEntry],
) -> None:
    p = planned(catalog_entry, "Meta-Llama-3-8B-Instruct", gpu="V100-32GB")
    assert p.dtype == "float16"
    assert any("no bfloat16" in note for note in p.notes)
    with pytest.raises(PlanError, match="has no bfloat16"):
        planned(catalog_entry, "Meta-Llama-3-8B-Instruct", gpu="V100-32GB", dtype="bfloat16")
    assert planned(catalog_entry, "Llama-2-7b-chat-hf", gpu="H100-80GB").dtype == "float16"  # as shipped


def test_quantizing_a_16bit_model_shrinks_its_weights(catalog_entry: dict[str, CatalogEntry]) -> None:
    options = {"gpu": "H100-80GB", "tensor_parallel_size": 1, "pipeline_parallel_size": 1}
    bf16 = planned(catalog_entry, "Meta-Llama-3.1-8B-Instruct", **options)
    fp8 = planned(catalog_entry, "Meta-Llama-3.1-8B-Instruct", quantization="fp8", **options)
    awq = planned(catalog_entry, "Meta-Llama-3.1-8B-Instruct", quantization="awq", **options)
    assert awq.weights_gib < fp8.weights_gib < bf16.weights_gib
    assert fp8.weights_gib == pytest.approx(bf16.weights_gib * 0.56, rel=0.02)  # embeddings stay 16-bit
    assert any("does not make on the fly" in note for note in awq.notes)
    with pytest.raises(PlanError, match="is a gptq checkpoint"):
        planned(catalog_entry, "Qwen-7B-Chat-Int4", quantization="none")


def test_bad_options_are_clear_errors(catalog_entry: dict[str, CatalogEntry]) -> None:
    with pytest.raises(UnknownGPU, match="Known: V100-16GB"):
        planned(catalog_entry, "tiny-chat", gpu="TPU-v5")
    with pytest.raises(PlanError, match="exceeds Llama-2-7b-chat-hf's maximum, 4096 tokens"):
        planned(catalog_entry, "Llama-2-7b-chat-hf", max_model_len=8192)
    with pytest.raises(PlanError, match="kv_cache_dtype 'int2'"):
        planned(catalog_entry, "tiny-chat", kv_cache_dtype="int2")
    with pytest.raises(PlanError, match="quantization 'int3'"):
        planned(catalog_entry, "tiny-chat", quantization="int3")


def test_the_catalogs_engine_args_are_planned_with(catalog_entry: dict[str, CatalogEntry]) -> None:
    tiny = planned(catalog_entry, "tiny-chat")
    assert tiny.kv_cache_available_gib == pytest.approx(0.25)  # its fixed 256 MiB KV cache
    eager = catalog_entry["Meta-Llama-3-8B-Instruct"].model_copy(
        update={"engine_args": {"enforce_eager": True}}
    )
    assert plan(eager).overhead_gib == pytest.approx(
        planned(catalog_entry, "Meta-Llama-3-8B-Instruct").overhead_gib - 0.5, abs=0.001
    )


def _write_model(root: Path, config: dict[str, object], index_total: int | None = None) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps(config))
    if index_total is not None:
        index = {"metadata": {"total_size": index_total}, "weight_map": {}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


LLAMA3_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
}


def test_a_local_model_directory_is_planned_from_its_config_and_index(tmp_path: Path) -> None:
    model = _write_model(tmp_path / "my-llama", LLAMA3_8B_CONFIG, index_total=16_060_522_496)
    p = plan(model, gpu="A100-80GB")
    assert p.model == "my-llama"
    assert p.weights_gib == pytest.approx(16_060_522_496 / GiB, abs=0.001)
    assert p.kv_cache_bytes_per_token == 131072
    assert p.max_model_len == 8192 and p.fits


def test_a_local_model_without_an_index_is_estimated_from_its_config(tmp_path: Path) -> None:
    p = plan(_write_model(tmp_path / "no-index", LLAMA3_8B_CONFIG), gpu="A100-80GB")
    assert p.weights_gib == pytest.approx(14.96, rel=0.01)  # 8.03B parameters in bf16


def test_a_local_qwen1_config_counts_one_mlp_half(tmp_path: Path) -> None:
    config = {
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "kv_channels": 128,
        "vocab_size": 151936,
        "seq_length": 8192,
        "bf16": True,
        "torch_dtype": "bfloat16",
    }
    p = plan(_write_model(tmp_path / "qwen-7b", config))
    assert p.weights_gib == pytest.approx(7.72e9 * 2 / GiB, rel=0.01)  # Qwen-7B: 7.72B parameters


def test_a_directory_without_config_json_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"has no config\.json"):
        plan(tmp_path)
    with pytest.raises(PlanError, match="No model directory at"):
        plan(tmp_path / "absent")
    broken = _write_model(tmp_path / "broken", {"model_type": "llama"})
    with pytest.raises(PlanError, match="lacks what planning needs: no `hidden_size`"):
        plan(broken)
