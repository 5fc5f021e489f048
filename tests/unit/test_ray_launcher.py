"""`--launcher ray` and `--distributed-executor-backend ray`, up to where Ray itself answers.

What a Ray job asks for, the flag reaching vLLM's own parser, and the error paths a user
meets before any cluster is involved: no address, an address nothing listens on, Ray's SDK
missing on the controller's host, Ray's options with another launcher. A real Ray head is in
tests/integration/test_ray.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.support.processes import free_port
from vpool.catalog.catalog import load_catalog
from vpool.cli import app
from vpool.config import ControllerSettings, LaunchSettings, ModelSpec
from vpool.controller.app import create_controller_app
from vpool.controller.job_spec import resolve
from vpool.controller.jobs import worker_argv
from vpool.controller.ray_jobs import RayJobView, job_state, submission
from vpool.launch import LaunchRequest
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.records import JobState
from vpool.worker.vllm_adapter import parse_vllm_args, vllm_cli_args


def _catalog():  # type: ignore[no-untyped-def]
    return load_catalog([], environ={})


def _request(model: str, launcher: str = "ray", **overrides: object) -> LaunchRequest:
    return LaunchRequest.model_validate({"model": model, "launcher": launcher, "overrides": overrides})


def _submission(request: LaunchRequest):  # type: ignore[no-untyped-def]
    spec = resolve(request, _catalog, LaunchSettings())
    argv = worker_argv("/venv/bin/python", spec.model, "http://ctl:8001", "/cache")
    return submission(
        "http://head:8265", "ray-1", "m-ray-1", argv, spec.model, spec.resources, LaunchSettings()
    )


def test_a_ray_job_reserves_tp_times_pp_gpus_and_none_for_a_cpu_model_or_vllms_own_ray_executor() -> None:
    gpu_job = _submission(
        _request(
            "Meta-Llama-3.1-70B-Instruct", tensor_parallel_size=4, pipeline_parallel_size=2, cpus_per_task=8
        )
    )
    assert (gpu_job.num_gpus, gpu_job.num_cpus) == (8, 8)
    assert "--distributed-executor-backend" not in gpu_job.argv
    # Over several nodes vLLM's Ray executor reserves the GPUs in a placement group of its
    # own: an entrypoint holding them would leave it none.
    spread = _submission(
        _request("Meta-Llama-3.1-70B-Instruct", tensor_parallel_size=4, pipeline_parallel_size=2, num_nodes=2)
    )
    assert spread.num_gpus == 0
    assert spread.argv[spread.argv.index("--distributed-executor-backend") + 1] == "ray"
    cpu_job = _submission(_request("tiny-chat"))
    assert (cpu_job.num_gpus, cpu_job.num_cpus) == (0, 4)  # the catalog's gpus_per_node 0, cpus 4
    # Ray's own default (3 s) would kill a worker before it drained.
    assert cpu_job.env_vars == {"VPOOL_WORKER_ID": "m-ray-1", "RAY_JOB_STOP_WAIT_TIME_S": "300"}


def test_the_job_directorys_launch_script_resubmits_the_same_job(tmp_path: Path) -> None:
    job = _submission(_request("tiny-chat", cpus_per_task=1))
    subprocess.run(["bash", "-n"], input=job.script().encode(), check=True)
    stand_in = tmp_path / "ray"  # a stand-in `ray` executable that records its arguments
    stand_in.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/args"\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    subprocess.run(["bash", "-c", job.script()], env=env, check=True)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:5] == ["job", "submit", "--address", "http://head:8265", "--no-wait"]
    assert args[args.index("--entrypoint-num-gpus") + 1] == "0"
    assert args[args.index("--entrypoint-num-cpus") + 1] == "1"
    assert json.loads(args[args.index("--runtime-env-json") + 1])["env_vars"]["VPOOL_WORKER_ID"] == "m-ray-1"
    assert args[-1].startswith("/venv/bin/python -m vpool.cli worker --model builtin:tiny-chat")


def test_ray_job_states_become_vpool_job_states_with_rays_reason_kept_short() -> None:
    waiting = RayJobView("PENDING", "Job has not started yet. It may be waiting for resources.")
    assert job_state(waiting) == (JobState.PENDING, waiting.message)
    assert job_state(RayJobView("RUNNING", "Job is currently running.")) == (JobState.LAUNCHING, None)
    logs = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
    )
    state, reason = job_state(RayJobView("FAILED", logs + "x" * 20_000))
    assert (state, reason) == (
        JobState.FAILED,
        "Ray: FAILED (Job entrypoint command failed with exit code 1)",
    )
    assert job_state(None) == (JobState.FAILED, "Ray no longer knows this job")


def test_the_ray_backend_reaches_vllms_own_parser() -> None:
    spec = ModelSpec(name="m", model="/m", tensor_parallel_size=2, pipeline_parallel_size=2,
                     distributed_executor_backend="ray")  # fmt: skip
    args = parse_vllm_args(vllm_cli_args(spec, "/m", "auto"))
    assert (args.distributed_executor_backend, args.tensor_parallel_size, args.pipeline_parallel_size) == (
        "ray",
        2,
        2,
    )
    assert (
        parse_vllm_args(
            vllm_cli_args(ModelSpec(name="m", model="/m"), "/m", "auto")
        ).distributed_executor_backend
        is None
    )


def test_the_worker_refuses_a_ray_address_without_the_ray_backend_and_an_unknown_backend() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["worker", "--model", "/m", "--ray-address", "10.0.0.5:6379"])
    assert result.exit_code == 2
    assert "--ray-address joins a Ray cluster: give --distributed-executor-backend ray too" in result.output
    result = runner.invoke(app, ["worker", "--model", "/m", "--distributed-executor-backend", "slurm"])
    assert result.exit_code == 2 and "distributed_executor_backend" in result.output


def _launch_files(log_dir: Path) -> list[Path]:
    return list(log_dir.rglob("launch.*"))


async def _post_launch(settings: ControllerSettings, body: dict[str, object]) -> httpx.Response:
    app_ = create_controller_app(settings, MemoryRegistry())
    transport = httpx.ASGITransport(app=app_, client=("127.0.0.1", 5000))
    async with (
        app_.router.lifespan_context(app_),
        httpx.AsyncClient(transport=transport, base_url="http://c") as c,
    ):
        return await c.post("/admin/v1/jobs", json=body)


async def test_a_ray_launch_without_an_address_or_with_ray_options_elsewhere_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    settings = ControllerSettings(launch=LaunchSettings(log_dir=tmp_path))
    resp = await _post_launch(settings, {"model": "tiny-chat", "launcher": "ray"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("no_ray_address", "ray_address")
    assert "--ray-address http://HEAD:8265" in error["message"]
    for launcher in ("local", "slurm"):
        resp = await _post_launch(
            settings,
            {"model": "tiny-chat", "launcher": launcher, "overrides": {"ray_address": "http://h:8265"}},
        )
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["message"] == f"--ray-address is for --launcher ray, not {launcher}."
    assert not _launch_files(tmp_path)  # nothing was started


async def test_a_ray_cluster_nothing_answers_at_is_a_launch_failure_that_names_it(tmp_path: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    settings = ControllerSettings(launch=LaunchSettings(log_dir=tmp_path, ray_address=address))
    resp = await _post_launch(settings, {"model": "tiny-chat", "launcher": "ray"})
    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "launch_failed"
    assert error["message"].startswith(f"could not submit the job on Ray at {address}: ")
    assert not _launch_files(tmp_path)


def test_a_controller_without_ray_installed_says_what_to_install(tmp_path: Path) -> None:
    # A stand-in for a host without Ray: the import of `ray` fails as if it were not installed.
    code = f"""
import sys, asyncio, httpx
sys.modules["ray"] = None
from vpool.config import ControllerSettings, LaunchSettings
from tests.unit.test_ray_launcher import _post_launch
settings = ControllerSettings(launch=LaunchSettings(log_dir={str(tmp_path)!r}, ray_address="http://127.0.0.1:1"))
resp = asyncio.run(_post_launch(settings, {{"model": "tiny-chat", "launcher": "ray"}}))
print(resp.status_code, resp.json()["error"]["message"])
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == (
        "502 the ray launcher needs Ray's job SDK on the controller's host: pip install 'ray[default]'"
    ), out.stderr
