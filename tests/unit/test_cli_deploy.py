"""`vpool deploy kubernetes` as a user runs it: the tree it writes, what it prints, and every
refusal (one sentence on stderr, or `{"error": {...}}` under `--json`; exit status 2, nothing
written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vpool.catalog.catalog import load_catalog
from vpool.catalog.planner import plan
from vpool.cli import app


@pytest.fixture(autouse=True)
def no_user_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPOOL_CATALOG", raising=False)


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["deploy", "kubernetes", *args])
    return result.exit_code, result.stdout, result.stderr


def test_it_writes_a_kustomize_tree_and_says_how_to_apply_it(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    code, stdout, _ = run("tiny-chat", "Meta-Llama-3.1-70B-Instruct", "--gpu", "h100", "--out", str(out))
    assert code == 0, stdout
    assert (out / "kustomization.yaml").is_file()
    assert (out / "workers" / "meta-llama-3-1-70b-instruct.yaml").is_file()
    assert f"kubectl apply -k {out}" in stdout
    assert "4 x H100-80GB, TP 4 x PP 1" in stdout


def test_json_lists_the_files_and_each_workers_layout(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    code, stdout, _ = run(
        "tiny-chat", "QwQ-32B", "--gpu", "L40S", "--out", str(out), "--replicas", "2", "--json"
    )
    assert code == 0
    body = json.loads(stdout)
    assert sorted(body["files"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    qwq = next(w for w in body["workers"] if w["model"] == "QwQ-32B")
    verdict = plan(load_catalog(environ={}).get("QwQ-32B"), gpu="L40S", max_nodes=1)
    assert qwq["gpus"] == verdict.num_gpus and qwq["tensor_parallel_size"] == verdict.tensor_parallel_size
    assert qwq["replicas"] == 2 and qwq["gpu"] == "L40S" and qwq["gpu_resource"] == "nvidia.com/gpu"


def test_without_gpu_cpu_models_get_cpu_workers_and_others_the_default_gpu(tmp_path: Path) -> None:
    code, stdout, _ = run("tiny-chat", "Qwen2.5-7B-Instruct", "--out", str(tmp_path / "t"), "--json")
    assert code == 0
    workers = {w["model"]: w for w in json.loads(stdout)["workers"]}
    assert workers["tiny-chat"]["gpus"] == 0 and workers["tiny-chat"]["image"] == "vpool/worker-cpu:0.1.0"
    assert workers["Qwen2.5-7B-Instruct"]["gpu"] == "A100-80GB"  # the planner's default GPU


def refused(args: list[str], out: Path, code_name: str, words: str) -> None:
    """Both renderings of one refusal, and nothing written."""
    before = sorted(out.rglob("*")) if out.exists() else None
    code, stdout, stderr = run(*args, "--out", str(out))
    assert code == 2 and words in stderr, stderr
    code, stdout, _ = run(*args, "--out", str(out), "--json")
    assert code == 2
    error = json.loads(stdout)["error"]
    assert error["code"] == code_name and words in error["message"]
    assert (sorted(out.rglob("*")) if out.exists() else None) == before


def test_an_unknown_model_is_refused_with_close_names(tmp_path: Path) -> None:
    refused(["tiny-chatt"], tmp_path / "t", "unknown_model", "Close names: tiny-chat")


def test_an_unknown_gpu_type_is_refused(tmp_path: Path) -> None:
    refused(["tiny-chat", "--gpu", "Z80"], tmp_path / "t", "unknown_gpu", 'Unknown GPU type "Z80"')


def test_a_model_that_does_not_fit_on_one_node_is_refused(tmp_path: Path) -> None:
    entry = load_catalog(environ={}).get("DeepSeek-R1")
    assert not plan(entry, gpu="H100-80GB", max_nodes=1).fits  # it needs two nodes of 8
    refused(
        ["DeepSeek-R1", "--gpu", "H100-80GB"], tmp_path / "t", "does_not_fit", "does not fit on 8 x H100-80GB"
    )
    assert not plan(
        load_catalog(environ={}).get("Meta-Llama-3.1-70B-Instruct"), gpu="A10", gpus_per_node=2, max_nodes=1
    ).fits
    refused(
        ["Meta-Llama-3.1-70B-Instruct", "--gpu", "A10", "--gpus-per-node", "2"],
        tmp_path / "t",
        "does_not_fit",
        "one node of up to 2 GPUs",
    )


def test_an_out_dir_that_is_not_empty_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "t"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused(["tiny-chat"], out, "out_not_empty", "is not empty")
    code, _, _ = run("tiny-chat", "--out", str(out), "--force")
    assert code == 0 and (out / "kustomization.yaml").is_file() and (out / "notes.txt").read_text() == "mine"


def test_an_out_dir_that_cannot_be_written_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(["tiny-chat"], blocker / "tree", "out_not_writable", "cannot write")
    refused(["tiny-chat"], blocker, "out_not_writable", "is not a directory")


def test_bad_images_namespaces_and_duplicates_are_refused(tmp_path: Path) -> None:
    refused(
        ["tiny-chat", "--image", "router=x:1"],
        tmp_path / "t",
        "invalid_deployment",
        "--image expects ROLE=IMAGE",
    )
    refused(
        ["tiny-chat", "--image", "gateway"],
        tmp_path / "t",
        "invalid_deployment",
        "--image expects ROLE=IMAGE",
    )
    refused(["tiny-chat", "--namespace", "My_NS"], tmp_path / "t", "invalid_deployment", "not a DNS label")
    refused(["tiny-chat", "TINY-CHAT"], tmp_path / "t", "invalid_deployment", "tiny-chat is named twice")


def test_help_explains_the_command() -> None:
    code, stdout, _ = run("--help")
    assert code == 0
    for words in ("kustomize", "--gpu", "--out", "--image", "planner", "vpool-secrets", "kubectl apply -k"):
        assert words in stdout
