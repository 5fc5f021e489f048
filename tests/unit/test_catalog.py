"""The model catalog and the GPU table: what ships, how user catalogs merge over it, and the
errors a bad file gets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vpool.catalog.catalog import CatalogEntry, CatalogError, load_catalog
from vpool.catalog.errors import UnknownGPU, UnknownModel
from vpool.catalog.gpus import auto_dtype, load_gpus
from vpool.worker.tiny_model import TINY_CHAT_SIZE

REQUIRED_MODELS = [
    "llama-30b",
    "Llama-2-7b-chat-hf",
    "Llama-2-13b-chat-hf",
    "Llama-2-70b-hf",
    "Meta-Llama-3-8B-Instruct",
    "Meta-Llama-3-70B-Instruct",
    "Meta-Llama-3.1-8B-Instruct",
    "Meta-Llama-3.1-70B-Instruct",
    "Qwen2-72B-Instruct",
    "QwQ-32B",
    "DeepSeek-R1",
    "DeepSeek-R1-Distill-Qwen-7B",
    "Qwen2.5-Math-PRM-7B",
    "Qwen-1_8B",
    "Qwen-7B",
    "Qwen-14B",
    "Qwen-72B",
    "Qwen-1_8B-Chat-Int4",
    "Qwen-7B-Chat-Int4",
    "Qwen-14B-Chat-Int4",
    "Qwen-72B-Chat-Int4",
    "Qwen2.5-0.5B-Instruct",
    "Qwen2.5-7B-Instruct",
    "Mistral-7B-Instruct-v0.3",
    "all-MiniLM-L6-v2",
    "tiny-chat",
]
REQUIRED_GPUS = [
    "V100-16GB", "V100-32GB", "T4", "A10", "A40", "L4", "L40S", "A100-40GB", "A100-80GB",
    "H100-80GB", "H200", "B200", "MI250", "MI300X", "MI308X", "RTX-3080", "RTX-3090", "RTX-4090",
    "A4000",
]  # fmt: skip
# Parser names vLLM 0.32 registers (vllm/tool_parsers/__init__.py, vllm/reasoning/__init__.py).
VLLM_TOOL_PARSERS = {"llama3_json", "hermes", "mistral", "deepseek_v3"}
VLLM_REASONING_PARSERS = {"deepseek_r1"}


@pytest.fixture(autouse=True)
def no_user_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    """A VPOOL_CATALOG on the machine running the tests does not leak into them."""
    monkeypatch.delenv("VPOOL_CATALOG", raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _independent_count(entry: CatalogEntry) -> int:
    """Parameters of a dense decoder from its figures, counted here rather than by the catalog."""
    a = entry.architecture
    h = a.hidden_size
    attention = 2 * h * a.num_attention_heads * a.head_dim + 2 * h * a.num_key_value_heads * a.head_dim
    mlp = (3 if a.gated_mlp else 2) * h * a.intermediate_size
    embeddings = a.vocab_size * h * (1 if a.tie_word_embeddings else 2)
    return a.num_hidden_layers * (attention + mlp) + embeddings


def test_builtin_catalog_has_every_model_the_fleet_needs() -> None:
    names = load_catalog().names()
    assert set(REQUIRED_MODELS) <= set(names)
    assert len(names) == len(set(names))


def test_dense_models_parameter_counts_match_their_architecture() -> None:
    for entry in load_catalog():
        arch = entry.architecture
        if arch.moe or arch.mla or arch.kv_cache == "none":
            continue
        assert _independent_count(entry) == pytest.approx(arch.parameters, rel=0.15), entry.name


def test_every_parameter_count_matches_the_catalogs_own_estimate() -> None:
    for entry in load_catalog():
        arch = entry.architecture
        assert arch.estimated_parameters() == pytest.approx(arch.parameters, rel=0.15), entry.name


def test_deepseek_r1_is_671b_total_and_37b_active_with_mla_and_fp8() -> None:
    r1 = load_catalog().get("DeepSeek-R1").architecture
    assert r1.parameters == pytest.approx(671e9, rel=0.01)  # DeepSeek-V3 report: 671B, 37B active
    assert r1.active_parameters == pytest.approx(37e9, rel=0.03)
    assert r1.estimated_parameters(active=True) == pytest.approx(r1.active_parameters, rel=0.01)
    assert r1.kv_cache == "mla" and r1.mla and (r1.mla.kv_lora_rank, r1.mla.qk_rope_head_dim) == (512, 64)
    assert r1.quantization and r1.quantization.method == "fp8"
    assert r1.moe and (r1.moe.num_experts, r1.moe.num_experts_per_tok) == (256, 8)


def test_published_figures_of_well_known_models() -> None:
    catalog = load_catalog()
    llama3 = catalog.get("Meta-Llama-3-8B-Instruct").architecture
    assert (llama3.num_hidden_layers, llama3.hidden_size, llama3.num_key_value_heads) == (32, 4096, 8)
    assert (llama3.vocab_size, llama3.max_position_embeddings, llama3.torch_dtype) == (
        128256,
        8192,
        "bfloat16",
    )
    assert catalog.get("Llama-2-70b-hf").architecture.parameters == pytest.approx(69e9, rel=0.01)
    assert catalog.get("Qwen2.5-0.5B-Instruct").architecture.tie_word_embeddings
    assert catalog.get("Meta-Llama-3.1-8B-Instruct").max_model_len == 131072


def test_int4_variants_are_gptq_4bit_of_the_same_architecture() -> None:
    catalog = load_catalog()
    for size in ("1_8B", "7B", "14B", "72B"):
        base, int4 = (
            catalog.get(f"Qwen-{size}").architecture,
            catalog.get(f"Qwen-{size}-Chat-Int4").architecture,
        )
        assert int4.quantization and (int4.quantization.method, int4.quantization.bits) == ("gptq", 4)
        assert (int4.parameters, int4.num_hidden_layers, int4.hidden_size) == (
            base.parameters,
            base.num_hidden_layers,
            base.hidden_size,
        )


def test_entries_are_consistent_with_themselves() -> None:
    for entry in load_catalog():
        arch = entry.architecture
        assert entry.max_model_len <= arch.max_position_embeddings, entry.name
        assert arch.num_attention_heads % arch.num_key_value_heads == 0, entry.name
        assert entry.weights_dir_name == entry.name, entry.name  # FAMILY-VARIANT is the name
        assert entry.tool_call_parser in VLLM_TOOL_PARSERS | {None}, entry.name
        assert entry.reasoning_parser in VLLM_REASONING_PARSERS | {None}, entry.name


def test_the_two_builtin_models_run_without_a_gpu_or_a_download() -> None:
    catalog = load_catalog()
    tiny, minilm = catalog.get("tiny-chat"), catalog.get("all-MiniLM-L6-v2")
    assert (tiny.model, tiny.slurm.gpus_per_node) == ("builtin:tiny-chat", 0)
    assert (minilm.model, minilm.type, minilm.runner) == ("builtin:all-MiniLM-L6-v2", "Embedding", "pooling")
    assert tiny.architecture.head_dim >= 64  # vLLM's CPU attention kernels


def test_tiny_chat_figures_are_the_ones_vpool_generates() -> None:
    made = TINY_CHAT_SIZE
    arch = load_catalog().get("tiny-chat").architecture
    assert made.hidden == arch.hidden_size
    assert made.intermediate == arch.intermediate_size
    assert made.layers == arch.num_hidden_layers
    assert made.heads == arch.num_attention_heads
    assert made.kv_heads == arch.num_key_value_heads
    assert made.max_len == arch.max_position_embeddings
    assert made.hidden // made.heads == arch.head_dim


def test_lookup_ignores_case_and_accepts_the_hub_id() -> None:
    catalog = load_catalog()
    assert catalog.get("qwen2.5-7b-instruct").name == "Qwen2.5-7B-Instruct"
    assert catalog.get("meta-llama/Llama-3.1-8B-Instruct").name == "Meta-Llama-3.1-8B-Instruct"
    assert "QWQ-32B" in catalog


def test_unknown_model_lists_close_names_first_those_holding_it() -> None:
    with pytest.raises(UnknownModel) as caught:
        load_catalog().get("llama-3-8b")
    assert isinstance(caught.value, KeyError)
    assert caught.value.choices[0] == "Meta-Llama-3-8B-Instruct"
    assert 'Unknown model "llama-3-8b"' in str(caught.value)
    assert "Meta-Llama-3-8B-Instruct" in str(caught.value)


def test_user_files_merge_field_by_field_in_order(tmp_path: Path) -> None:
    env_a = write(tmp_path / "a.yaml", "models:\n  - {name: Llama-2-7b-chat-hf, slurm: {partition: a100}}\n")
    env_b = write(
        tmp_path / "b.yaml",
        "models:\n  Llama-2-7b-chat-hf:\n    slurm: {qos: high}\n    engine_args: {enforce_eager: true}\n",
    )
    flag = write(
        tmp_path / "flag.yaml", "{name: Llama-2-7b-chat-hf, slurm: {partition: h100}, max_model_len: 2048}\n"
    )
    builtin = load_catalog().get("Llama-2-7b-chat-hf")

    catalog = load_catalog([flag], environ={"VPOOL_CATALOG": f"{env_a}:{env_b}"})
    merged = catalog.get("Llama-2-7b-chat-hf")
    assert merged.slurm.partition == "h100"  # --catalog comes after VPOOL_CATALOG
    assert merged.slurm.qos == "high"  # from b.yaml, a.yaml's partition kept until flag.yaml
    assert merged.engine_args == {"enforce_eager": True}
    assert merged.max_model_len == 2048
    assert merged.slurm.gpus_per_node == builtin.slurm.gpus_per_node
    assert merged.architecture == builtin.architecture
    assert merged.model == builtin.model
    assert catalog.sources[1:] == [str(env_a), str(env_b), str(flag)]

    only_env = load_catalog(environ={"VPOOL_CATALOG": f"{env_a}:{env_b}"}).get("Llama-2-7b-chat-hf")
    assert (only_env.slurm.partition, only_env.slurm.qos) == ("a100", "high")


def test_vpool_catalog_is_read_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user = write(tmp_path / "u.yaml", "models: [{name: QwQ-32B, slurm: {account: x}}]\n")
    monkeypatch.setenv("VPOOL_CATALOG", str(user))
    with pytest.raises(
        CatalogError, match=re.escape(f'catalog {user}, model "QwQ-32B", field slurm.account: Extra')
    ):
        load_catalog()


def test_null_in_a_user_file_puts_a_field_back_to_its_default(tmp_path: Path) -> None:
    user = write(tmp_path / "u.yaml", "models: [{name: Mistral-7B-Instruct-v0.3, tool_call_parser: null}]\n")
    assert load_catalog([user]).get("Mistral-7B-Instruct-v0.3").tool_call_parser is None


def test_a_user_file_adds_a_custom_model(tmp_path: Path) -> None:
    user = write(
        tmp_path / "custom.yaml",
        """\
models:
  - name: MyOrg-llama-ft
    family: MyOrg
    variant: llama-ft
    model: myorg/llama-ft
    max_model_len: 4096
    slurm: {partition: gpu, gpus_per_node: 2}
    architecture:
      hf_architecture: LlamaForCausalLM
      parameters: 6738415616
      num_hidden_layers: 32
      hidden_size: 4096
      num_attention_heads: 32
      num_key_value_heads: 32
      head_dim: 128
      intermediate_size: 11008
      vocab_size: 32000
      max_position_embeddings: 4096
      torch_dtype: float16
""",
    )
    catalog = load_catalog([user])
    assert catalog.names()[-1] == "MyOrg-llama-ft"
    custom = catalog.get("MyOrg-llama-ft")
    assert custom.slurm.gpus_per_node == 2
    assert custom.weights_path("/weights") == "/weights/MyOrg-llama-ft"


def test_weights_path_prefers_the_entrys_dir_then_the_parent_then_the_hub_id() -> None:
    entry = load_catalog().get("Qwen2.5-7B-Instruct")
    assert entry.weights_path(Path("/shared/weights")) == "/shared/weights/Qwen2.5-7B-Instruct"
    assert entry.weights_path(None) == "Qwen/Qwen2.5-7B-Instruct"
    pinned = entry.model_copy(update={"weights_dir": "/scratch/q7"})
    assert pinned.weights_path(Path("/shared/weights")) == "/scratch/q7"
    tiny = load_catalog().get("tiny-chat")
    assert tiny.weights_path(Path("/shared/weights")) == "builtin:tiny-chat"


def test_a_bad_entry_names_the_file_the_model_and_the_field(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.yaml", "models:\n  - {name: Llama-2-7b-chat-hf, slurm: {gpus_per_node: many}}\n"
    )
    with pytest.raises(CatalogError) as caught:
        load_catalog([bad])
    where = f'catalog {bad}, model "Llama-2-7b-chat-hf", field slurm.gpus_per_node'
    assert str(caught.value).startswith(f"{where}: Input should be a valid integer")


def test_an_incomplete_new_model_names_what_it_lacks(tmp_path: Path) -> None:
    bad = write(tmp_path / "new.yaml", "models:\n  - {name: foo, family: bar, max_model_len: 10}\n")
    with pytest.raises(CatalogError) as caught:
        load_catalog([bad])
    message = str(caught.value)
    assert f'catalog {bad}, model "foo", field model: Field required' in message
    assert f'catalog {bad}, model "foo", field architecture: Field required' in message


def test_a_length_past_the_models_maximum_is_refused(tmp_path: Path) -> None:
    bad = write(tmp_path / "long.yaml", "models: [{name: Llama-2-7b-chat-hf, max_model_len: 8192}]\n")
    with pytest.raises(
        CatalogError, match="max_model_len 8192 exceeds the model's max_position_embeddings 4096"
    ):
        load_catalog([bad])


def test_unreadable_catalog_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=re.escape(f"catalog {tmp_path / 'missing.yaml'}: file not found")):
        load_catalog([tmp_path / "missing.yaml"])
    broken = write(tmp_path / "broken.yaml", "models: [\n")
    with pytest.raises(CatalogError, match=re.escape(f"catalog {broken}: not valid YAML")):
        load_catalog([broken])
    nameless = write(tmp_path / "nameless.yaml", "models: [{slurm: {qos: x}}]\n")
    with pytest.raises(
        CatalogError, match=re.escape(f"catalog {nameless}, model #1, field name: Field required")
    ):
        load_catalog([nameless])


def test_vllm_engine_args_carry_the_parsers() -> None:
    r1 = load_catalog().get("DeepSeek-R1").vllm_engine_args()
    assert r1["tool_call_parser"] == "deepseek_v3"
    assert r1["enable_auto_tool_choice"] is True
    assert r1["reasoning_parser"] == "deepseek_r1"
    assert "tool_call_parser" not in load_catalog().get("Qwen-7B").vllm_engine_args()


def test_gpu_table_has_every_gpu_with_its_marketed_memory() -> None:
    gpus = load_gpus()
    assert set(REQUIRED_GPUS) <= set(gpus.names())
    assert gpus.get("H100-80GB").memory_gib == 80
    assert gpus.get("H200").memory_gib == 141
    assert gpus.get("MI300X").memory_gib == 192
    assert gpus.get("T4").memory_gib == 16


def test_gpu_names_match_any_case_and_short_aliases() -> None:
    gpus = load_gpus()
    assert gpus.get("h100").name == "H100-80GB"
    assert gpus.get("a100").name == "A100-80GB"
    assert gpus.get("A100-40gb").name == "A100-40GB"
    assert gpus.get("mi300x").name == "MI300X"
    assert gpus.get("rtx 4090").name == "RTX-4090"


def test_unknown_gpu_lists_the_known_ones() -> None:
    with pytest.raises(UnknownGPU) as caught:
        load_gpus().get("Z100")
    assert isinstance(caught.value, KeyError)
    assert "H100-80GB" in str(caught.value) and "MI300X" in str(caught.value)


def test_bf16_comes_with_compute_capability_8_and_on_amd() -> None:
    for gpu in load_gpus():
        if gpu.vendor == "nvidia":
            assert gpu.compute_capability is not None
            assert gpu.bf16 == (int(gpu.compute_capability.split(".")[0]) >= 8), gpu.name
        else:
            assert gpu.bf16 and gpu.gfx, gpu.name


def test_auto_dtype_is_bf16_from_compute_capability_8_and_keeps_float16_checkpoints() -> None:
    gpus = load_gpus()
    assert auto_dtype(gpus.get("A100-80GB"), "bfloat16") == "bfloat16"
    assert auto_dtype(gpus.get("MI300X"), "bfloat16") == "bfloat16"
    assert auto_dtype(gpus.get("V100-32GB"), "bfloat16") == "float16"
    assert auto_dtype(gpus.get("T4"), "float32") == "float16"
    assert auto_dtype(gpus.get("H100-80GB"), "float32") == "bfloat16"
    assert auto_dtype(gpus.get("H100-80GB"), "float16") == "float16"
