"""What a launch resolves to: the catalog entry, the launch's overrides, the planner's word."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from vpool.catalog.catalog import load_catalog
from vpool.cli.jobs import derive_metrics
from vpool.config import ControllerSettings, LaunchSettings
from vpool.controller.app import create_controller_app
from vpool.controller.job_spec import DoesNotFit, UnknownModel, resolve
from vpool.controller.jobs import JobManager
from vpool.controller.worker_metrics import parse_vllm_metrics
from vpool.errors import InvalidRequest, VpoolError
from vpool.launch import LaunchRequest
from vpool.registry.memory_backend import MemoryRegistry
from vpool.registry.records import JobRecord, JobState

SETTINGS = LaunchSettings()


def _catalog():  # type: ignore[no-untyped-def]
    return load_catalog([], environ={})


def _launch(model: str, launcher: str = "slurm", force: bool = False, **overrides: object) -> LaunchRequest:
    return LaunchRequest.model_validate(
        {"model": model, "launcher": launcher, "force": force, "overrides": overrides}
    )


def test_the_catalogs_defaults_apply_and_each_override_replaces_its_own() -> None:
    spec = resolve(_launch("Meta-Llama-3.1-8B-Instruct"), _catalog, SETTINGS)
    entry = _catalog().get("Meta-Llama-3.1-8B-Instruct")
    assert spec.model.model == entry.weights_path(None)
    assert spec.resources.gpus_per_node == entry.slurm.gpus_per_node
    assert spec.model.max_model_len == entry.max_model_len
    changed = resolve(
        _launch("Meta-Llama-3.1-8B-Instruct", max_model_len=4096, partition="a100", qos="high",
                time="01:00:00", replicas=2, engine_args={"max_num_seqs": 8},
                vllm_args="--enable-prefix-caching,--block-size=32", weights_dir="/shared/weights"),
        _catalog, SETTINGS,
    )  # fmt: skip
    assert changed.model.max_model_len == 4096 and changed.replicas == 2
    assert (changed.resources.partition, changed.resources.qos, changed.resources.time) == (
        "a100",
        "high",
        "01:00:00",
    )
    assert changed.model.engine_args["max_num_seqs"] == 8
    assert (
        changed.model.engine_args["enable_prefix_caching"] is True
        and changed.model.engine_args["block_size"] == 32
    )
    assert changed.model.model == f"/shared/weights/{entry.family}-{entry.variant}"
    assert changed.config["partition"] == "a100"


def test_an_embedding_model_runs_as_pooling() -> None:
    assert resolve(_launch("all-MiniLM-L6-v2"), _catalog, SETTINGS).model.runner == "pooling"


def test_with_a_gpu_the_planner_picks_the_parallel_sizes() -> None:
    spec = resolve(
        _launch("Meta-Llama-3.1-70B-Instruct", gpu="H100-80GB", max_model_len=8192), _catalog, SETTINGS
    )
    assert spec.model.tensor_parallel_size >= 2
    assert spec.config["plan"]["fits"] is True


def test_a_model_that_cannot_fit_is_refused_with_the_numbers_unless_forced() -> None:
    request = _launch("DeepSeek-R1", gpu="T4", tensor_parallel_size=1, pipeline_parallel_size=1)
    with pytest.raises(DoesNotFit) as refused:
        resolve(request, _catalog, SETTINGS)
    assert refused.value.status_code == 422
    assert "GiB per GPU" in refused.value.message and "--force" in refused.value.message
    forced = resolve(request.model_copy(update={"force": True}), _catalog, SETTINGS)
    assert forced.config["plan"]["fits"] is False


def test_unknown_models_gpus_and_bad_vllm_args_are_clear_errors() -> None:
    with pytest.raises(UnknownModel) as unknown:
        resolve(_launch("Lama-3-8B"), _catalog, SETTINGS)
    assert unknown.value.status_code == 404 and "vpool list" in unknown.value.message
    with pytest.raises(InvalidRequest) as gpu:
        resolve(_launch("Meta-Llama-3-8B-Instruct", gpu="GTX-480"), _catalog, SETTINGS)
    assert gpu.value.status_code == 400
    with pytest.raises(InvalidRequest) as args:
        resolve(_launch("Meta-Llama-3-8B-Instruct", vllm_args="enforce-eager"), _catalog, SETTINGS)
    assert args.value.param == "vllm_args"


async def test_the_admin_api_answers_only_loopback_without_a_token_and_wants_it_when_set() -> None:
    for token, client_host, expected in [(None, "10.1.2.3", 403), (None, "127.0.0.1", 200),
                                         ("s3cret", "127.0.0.1", 401)]:  # fmt: skip
        app = create_controller_app(ControllerSettings(admin_token=token), MemoryRegistry())
        transport = httpx.ASGITransport(app=app, client=(client_host, 5000))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://c") as http,
        ):
            resp = await http.get("/admin/v1/jobs")
        assert resp.status_code == expected, (token, client_host, resp.text)
        if expected != 200:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


VLLM_METRICS = """# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 120.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 300.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 3.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 2.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 2.5
"""


def test_vllm_metrics_become_the_figures_vpool_metrics_shows_with_throughput_between_two_reads() -> None:
    first = parse_vllm_metrics(VLLM_METRICS, "http://w", at=100.0)
    assert (first.prompt_tokens_total, first.generation_tokens_total) == (120, 300)
    assert (first.requests_running, first.requests_waiting, first.kv_cache_usage) == (2, 1, 0.25)
    assert first.successful_requests_total == 5 and first.average_latency_s == 0.5
    later = first.model_copy(
        update={"at": 102.0, "prompt_tokens_total": 220.0, "generation_tokens_total": 700.0}
    )
    row = derive_metrics(first.model_dump(), later.model_dump())
    assert (row["prompt_throughput"], row["generation_throughput"]) == (50.0, 200.0)
    assert derive_metrics(None, first.model_dump())["generation_throughput"] == 0.0


async def test_a_controller_follows_its_own_jobs_and_leaves_another_controllers_alone(tmp_path: Path) -> None:
    registry = MemoryRegistry()
    settings = ControllerSettings(launch=LaunchSettings(log_dir=tmp_path))
    async with httpx.AsyncClient() as http:
        manager = JobManager(settings, registry, _catalog, http)
        base = JobRecord(job_id="local-a", launcher="local", model="tiny-chat", state=JobState.LAUNCHING,
                         log_dir=str(tmp_path))  # fmt: skip
        await registry.put_job(base.model_copy(update={"controller": "another-host:8001"}))
        await registry.put_job(base.model_copy(update={"job_id": "local-b", "controller": manager.owner}))
        foreign = await manager.get("local-a")
        assert foreign.state == JobState.LAUNCHING  # its controller has the process, not this one
        own = await manager.get("local-b")
        assert own.state == JobState.FAILED and "restarted" in (own.reason or "")
        with pytest.raises(VpoolError) as missing:
            await manager.get("nope")
        assert missing.value.status_code == 404
