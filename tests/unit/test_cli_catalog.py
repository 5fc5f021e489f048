"""`vpool list` and `vpool plan` as a user runs them: tables, one JSON object, exit codes and
error sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vpool.cli import app

PLAN_KEYS = {
    "model", "gpu", "gpu_memory_gib", "dtype", "weights_gib", "kv_cache_gib", "overhead_gib", "total_gib",
    "tensor_parallel_size", "pipeline_parallel_size", "fits", "max_model_len_that_fits", "summary",
}  # fmt: skip


@pytest.fixture(autouse=True)
def no_user_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPOOL_CATALOG", raising=False)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_list_json_holds_every_model() -> None:
    code, out, _ = run("list", "--json")
    assert code == 0
    models = json.loads(out)["models"]
    names = [m["name"] for m in models]
    assert "Meta-Llama-3.1-70B-Instruct" in names and "tiny-chat" in names
    assert all({"type", "family", "slurm", "architecture"} <= set(m) for m in models)


def test_list_shows_a_table_of_the_catalog() -> None:
    code, out, _ = run("list")
    assert code == 0
    assert "Model catalog" in out
    assert "DeepSeek-R1" in out and "671B (37.6B active)" in out and "8 x 2 nodes" in out
    assert "CPU" in out  # the builtin models


def test_list_one_model_shows_its_whole_entry() -> None:
    code, out, _ = run("list", "Qwen2.5-7B-Instruct", "--json")
    assert code == 0
    entry = json.loads(out)
    assert entry["name"] == "Qwen2.5-7B-Instruct"
    assert entry["model"] == "Qwen/Qwen2.5-7B-Instruct"
    assert entry["architecture"]["num_key_value_heads"] == 4
    assert entry["tool_call_parser"] == "hermes"

    code, out, _ = run("list", "Qwen2.5-7B-Instruct")
    assert code == 0
    assert "architecture.num_key_value_heads" in out and "slurm.gpus_per_node" in out


def test_list_with_a_user_catalog_shows_the_merged_entry(tmp_path: Path) -> None:
    user = tmp_path / "site.yaml"
    user.write_text("models: [{name: Qwen2.5-7B-Instruct, slurm: {partition: a100, qos: high}}]\n")
    code, out, _ = run("list", "Qwen2.5-7B-Instruct", "--catalog", str(user), "--json")
    assert code == 0
    slurm = json.loads(out)["slurm"]
    assert (slurm["partition"], slurm["qos"], slurm["gpus_per_node"]) == ("a100", "high", 1)


def test_a_bad_user_catalog_is_exit_2_naming_file_model_and_field(tmp_path: Path) -> None:
    user = tmp_path / "bad.yaml"
    user.write_text("models: [{name: Qwen2.5-7B-Instruct, slurm: {gpus_per_node: lots}}]\n")
    code, _, err = run("list", "--catalog", str(user))
    assert code == 2
    assert f'catalog {user}, model "Qwen2.5-7B-Instruct", field slurm.gpus_per_node: Input should be' in err


def test_plan_json_is_one_object_with_the_plan(tmp_path: Path) -> None:
    code, out, _ = run("plan", "Meta-Llama-3-8B-Instruct", "--gpu", "A100-80GB", "--json")
    assert code == 0
    result = json.loads(out)  # one object: json.loads would fail on anything more
    assert PLAN_KEYS <= set(result)
    assert result["fits"] is True and result["tensor_parallel_size"] == 1
    assert result["summary"].startswith("Meta-Llama-3-8B-Instruct fits on 1 x A100-80GB (TP 1)")


def test_plan_prints_a_table_and_one_sentence() -> None:
    code, out, _ = run(
        "plan", "Meta-Llama-3.1-70B-Instruct", "--gpu", "H100-80GB", "--max-model-len", "32768",
        "--concurrency", "16",
    )  # fmt: skip
    assert code == 0
    assert "weights" in out and "KV cache" in out and "overhead" in out
    assert "Meta-Llama-3.1-70B-Instruct fits on 8 x H100-80GB (TP 8): " in out
    assert "GiB per GPU." in out


def test_plan_that_does_not_fit_exits_1_and_says_what_would() -> None:
    code, out, _ = run(
        "plan", "Meta-Llama-3.1-8B-Instruct", "--gpu", "A10G", "--max-model-len", "131072",
        "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1",
    )  # fmt: skip
    assert code == 1
    assert "does not fit on 1 x A10G (TP 1)" in out
    assert "the longest max_model_len that fits is" in out


def test_plan_options_reach_the_planner() -> None:
    code, out, _ = run(
        "plan", "Meta-Llama-3.1-70B-Instruct", "--gpu", "h100", "--quantization", "fp8",
        "--kv-cache-dtype", "fp8", "--gpu-memory-utilization", "0.8", "--dtype", "bfloat16", "--json",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert (result["gpu"], result["quantization"], result["kv_cache_dtype"]) == ("H100-80GB", "fp8", "fp8")
    assert result["gpu_memory_utilization"] == 0.8


def test_plan_of_a_local_model_directory(tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    model.mkdir()
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 32768,
        "torch_dtype": "bfloat16",
    }  # fmt: skip
    (model / "config.json").write_text(json.dumps(config))
    code, out, _ = run("plan", str(model), "--gpu", "L40S", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["model"] == "my-model" and result["max_model_len"] == 32768


def test_unknown_model_is_exit_2_with_close_names() -> None:
    code, _, err = run("plan", "llama-3-8b")
    assert code == 2
    assert 'Unknown model "llama-3-8b"' in err and "Meta-Llama-3-8B-Instruct" in err

    code, out, _ = run("plan", "llama-3-8b", "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert error["code"] == "unknown_model"
    assert error["choices"][0] == "Meta-Llama-3-8B-Instruct"

    code, _, err = run("list", "no-such-model")
    assert code == 2 and 'Unknown model "no-such-model"' in err


def test_unknown_gpu_is_exit_2_listing_the_known_ones() -> None:
    code, _, err = run("plan", "tiny-chat", "--gpu", "GTX-480")
    assert code == 2
    assert 'Unknown GPU type "GTX-480"' in err and "H100-80GB" in err and "MI300X" in err

    code, out, _ = run("plan", "tiny-chat", "--gpu", "GTX-480", "--json")
    assert code == 2
    assert json.loads(out)["error"]["code"] == "unknown_gpu"


def test_a_missing_model_directory_is_exit_2(tmp_path: Path) -> None:
    code, _, err = run("plan", str(tmp_path / "nowhere"))
    assert code == 2
    assert "No model directory at" in err
