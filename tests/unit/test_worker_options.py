"""How a catalog entry and CLI flags become a vLLM engine's options (no engine started)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from vpool.cli import app
from vpool.cli.common import parse_engine_args as _parse_engine_args
from vpool.config import ModelSpec
from vpool.worker.model_source import pick_dtype, resolve_model_path
from vpool.worker.vllm_adapter import parse_vllm_args, vllm_cli_args


def test_auto_dtype_is_bfloat16_on_ampere_and_newer() -> None:
    assert pick_dtype("auto", (8, 0)) == "bfloat16"
    assert pick_dtype("auto", (9, 0)) == "bfloat16"


def test_auto_dtype_is_float16_on_older_gpus() -> None:
    assert pick_dtype("auto", (7, 5)) == "float16"


def test_auto_dtype_is_left_to_vllm_on_cpu_and_explicit_dtype_wins() -> None:
    assert pick_dtype("auto", None, cpu_has_bf16=True) == "auto"
    assert pick_dtype("float16", (9, 0)) == "float16"


def test_auto_dtype_is_float32_on_cpus_without_bfloat16() -> None:
    assert pick_dtype("auto", None, cpu_has_bf16=False) == "float32"


def test_catalog_entry_becomes_flags_vllm_itself_accepts() -> None:
    spec = ModelSpec(
        name="chat",
        aliases=["chat-alias"],
        model="/m",
        tensor_parallel_size=2,
        pipeline_parallel_size=1,
        max_model_len=2048,
        gpu_memory_utilization=0.3,
        engine_args={"enforce_eager": True, "max_num_seqs": 8, "enable_prefix_caching": False},
    )
    args = parse_vllm_args(vllm_cli_args(spec, "/m", "bfloat16"))
    assert args.model == "/m"
    assert args.served_model_name == ["chat", "chat-alias"]
    assert args.tensor_parallel_size == 2
    assert args.max_model_len == 2048
    assert args.gpu_memory_utilization == 0.3
    assert args.enforce_eager is True
    assert args.max_num_seqs == 8
    assert args.enable_prefix_caching is False
    assert args.dtype == "bfloat16"


def test_unknown_engine_flag_is_refused_by_vllms_parser() -> None:
    spec = ModelSpec(name="x", model="/m", engine_args={"no_such_flag": 1})
    with pytest.raises(SystemExit):
        parse_vllm_args(vllm_cli_args(spec, "/m", "auto"))


def test_engine_arg_pairs_parse_yaml_scalars() -> None:
    parsed = _parse_engine_args(["enforce_eager=true", "max-num-seqs=4", "kv_cache_dtype=fp8", "x=[1, 2]"])
    assert parsed == {"enforce_eager": True, "max_num_seqs": 4, "kv_cache_dtype": "fp8", "x": [1, 2]}


def test_engine_arg_without_equals_is_an_error() -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _parse_engine_args(["enforce_eager"])


def test_worker_cli_rejects_a_bad_engine_arg_clearly() -> None:
    result = CliRunner().invoke(app, ["worker", "--model", "/m", "--engine-arg", "oops"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


def test_builtin_minilm_resolves_to_the_packaged_model() -> None:
    path = resolve_model_path("builtin:all-MiniLM-L6-v2", cache_dir=None)  # type: ignore[arg-type]
    assert path.endswith("model")


def test_unknown_builtin_names_the_choices() -> None:
    with pytest.raises(ValueError, match="builtin:tiny-chat"):
        resolve_model_path("builtin:gpt-5", cache_dir=None)  # type: ignore[arg-type]


def test_paths_and_hub_ids_pass_through() -> None:
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct", cache_dir=None) == "Qwen/Qwen2.5-0.5B-Instruct"  # type: ignore[arg-type]


def test_split_mode_commands_refuse_the_in_memory_registry() -> None:
    result = CliRunner().invoke(app, ["gateway"])
    assert result.exit_code == 2
    assert "--redis-url" in result.output


def test_public_bind_without_key_is_refused_at_start() -> None:
    result = CliRunner().invoke(
        app, ["gateway", "--host", "0.0.0.0", "--redis-url", "redis://127.0.0.1:6379/0"]
    )
    assert result.exit_code == 2
    assert "--no-auth" in result.output
