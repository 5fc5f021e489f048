"""`vpool launch --launcher slurm` on a real Slurm that this test session starts (two nodes on
this one host).

A second controller joins the session fleet's registry (the same Redis prefix), with Slurm
as its launcher and a user catalog holding two custom models: `slurm-chat` (tiny-chat's
weights under a name no session worker serves, so a chat answered by that name proves the
Slurm job's worker answered) and `broken-chat` (weights that do not exist). Its jobs'
workers register with it, and the session's gateways serve them.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import API_KEY, TOKEN, Fleet
from tests.support.jobs import follow_job
from tests.support.processes import Proc, free_port
from tests.support.slurm_cluster import SlurmCluster, slurm_cluster
from vpool.catalog.catalog import load_catalog
from vpool.client import VpoolClient, VpoolClientError, launch_request
from vpool.launch import LaunchRequest
from vpool.registry.records import JobState

# A job waits for the engine to start on a machine that runs the session fleet too: give each
# test more than the suite-wide 600 s.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

ADMIN = "test-admin-token"
READY_TIMEOUT_S = 480
SETTLED = {JobState.READY, JobState.FAILED}
ENDED = {JobState.SHUTDOWN, JobState.FAILED}


@dataclass
class SlurmController:
    url: str
    log_dir: Path
    cluster: SlurmCluster

    def client(self) -> VpoolClient:
        return VpoolClient(self.url, admin_token=ADMIN, timeout_s=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def controller(
    fleet: Fleet, cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlurmController]:
    work = tmp_path_factory.mktemp("slurm-controller")
    tiny = load_catalog([]).get("tiny-chat").model_dump(mode="json", exclude_none=True)
    catalog = {
        "models": [
            {**tiny, "name": "slurm-chat", "variant": "slurm", "max_model_len": 1024,
             "slurm": {"gpus_per_node": 0, "cpus_per_task": cluster.cpus, "partition": "debug",
                       "mem_per_node": "4G"}},
            {**tiny, "name": "broken-chat", "variant": "broken", "model": "vpool-test/broken-chat",
             "weights_dir": str(work / "no-such-weights"),
             "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "mem_per_node": "2G"}},
        ]
    }  # fmt: skip
    (work / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    port = free_port()
    config = yaml.safe_load(fleet.config_path.read_text())
    config["controller"] = {
        **config["controller"],
        "port": port,
        "admin_token": ADMIN,
        "launch": {
            "log_dir": str(work / "jobs"),
            "catalog": [str(work / "catalog.yaml")],
            "poll_interval_s": 1.0,
        },
    }
    config["models"] = []
    (work / "controller.yaml").write_text(yaml.safe_dump(config))
    env = {**cluster.env(), "VPOOL_REGISTRATION_TOKEN": TOKEN, "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    log = work / "controller.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "vpool.cli", "controller", "--config", str(work / "controller.yaml")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    proc = Proc("slurm-controller", popen, log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1).is_success:
                break
        except httpx.HTTPError:
            pass
        assert popen.poll() is None and time.monotonic() < deadline, proc.log_tail()
        time.sleep(0.2)
    try:
        yield SlurmController(url, work / "jobs", cluster)
    finally:
        proc.stop(signal.SIGTERM, timeout=30)


@pytest.fixture(autouse=True)
def no_jobs_left_behind(controller: SlurmController) -> Iterator[None]:
    """A test that fails half-way leaves no job queued in front of the next test's."""
    yield
    subprocess.run(["scancel", "--user", "root"], env=controller.cluster.env(), check=False, timeout=30)


def _follow(
    controller: SlurmController, job_id: str, until: set[JobState], timeout_s: float
) -> list[JobState]:
    """The states a job goes through until one in `until`; Slurm's view when it fails."""
    return follow_job(controller.client, job_id, until, timeout_s, lambda: _slurm_view(controller, job_id))


def _slurm_view(controller: SlurmController, job_id: str) -> str:
    """What Slurm and the job's own logs say, for a failure message."""
    cluster = controller.cluster
    parts = []
    for argv in (("scontrol", "show", "job", job_id.split("+")[0]), ("sinfo", "-N", "-l")):
        try:
            parts.append(f"$ {' '.join(argv)}\n{cluster.run(*argv)}")
        except (subprocess.SubprocessError, OSError) as exc:
            parts.append(f"$ {' '.join(argv)}: {exc}")
    for log in sorted(controller.log_dir.rglob("*.log")):
        parts.append(f"--- {log}\n{log.read_text(errors='replace')[-2000:]}")
    return "\n".join([*parts, cluster.logs()])


def _chat(gateway_url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(
        f"{gateway_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )


def test_a_slurm_job_goes_pending_launching_ready_serves_then_shuts_down(
    controller: SlurmController, fleet: Fleet
) -> None:
    with controller.client() as client:
        (job,) = client.launch("slurm-chat", launcher="slurm")
        assert job.state == JobState.PENDING and job.launcher == "slurm"
        seen = [
            JobState.PENDING,
            *_follow(controller, job.job_id, SETTLED, READY_TIMEOUT_S),
        ]
        assert [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s] == [
            JobState.PENDING, JobState.LAUNCHING, JobState.READY,
        ], client.log(job.job_id, -3000)[0]  # fmt: skip
        job = client.status(job.job_id)
        job_dir = Path(job.log_dir)
        assert job_dir.name == f"slurm-chat.{job.job_id}" and job_dir.parent.name == "tiny"
        script = (job_dir / "launch.sbatch").read_text()
        assert (
            "#SBATCH --partition=debug" in script
            and f"#SBATCH --cpus-per-task={controller.cluster.cpus}" in script
        )
        assert job.worker_urls[0] in (job_dir / "launch.json").read_text()

        deadline = time.monotonic() + 10
        while (answer := _chat(fleet.gateway_url, "slurm-chat")).status_code != 200:
            assert time.monotonic() < deadline, answer.text  # the gateways' next refresh
            time.sleep(0.3)
        assert answer.headers["x-vpool-worker"] == job.worker_ids[0]

        # A job that needs both nodes waits while one is busy, with Slurm's reason.
        (waiting,) = client.launch("slurm-chat", launcher="slurm", num_nodes=2)
        deadline = time.monotonic() + 30
        while (queued := client.status(waiting.job_id)).reason is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queued.state == JobState.PENDING and queued.reason == "Resources", queued
        client.shutdown(waiting.job_id)
        assert _follow(controller, waiting.job_id, ENDED, 60)[-1] == JobState.SHUTDOWN

        client.shutdown(job.job_id)
        assert _follow(controller, job.job_id, ENDED, 120)[-1] == JobState.SHUTDOWN
        assert _chat(fleet.gateway_url, "slurm-chat").status_code in (404, 503)
        assert job.job_id not in controller.cluster.run("squeue", "-h", "-o", "%i").split()


def test_a_job_whose_weights_do_not_exist_ends_failed_with_the_reason(controller: SlurmController) -> None:
    with controller.client() as client:
        (job,) = client.launch("broken-chat", launcher="slurm")
        assert _follow(controller, job.job_id, SETTLED, 300)[-1] == JobState.FAILED
        failed = client.status(job.job_id)
    assert failed.reason is not None
    assert "Slurm: FAILED" in failed.reason  # the worker exited 1, so did the job
    assert "no-such-weights" in failed.reason or "not" in failed.reason.lower(), failed.reason


def test_a_batch_launch_is_one_heterogeneous_job_with_a_component_per_model(
    controller: SlurmController,
) -> None:
    with controller.client() as client:
        jobs = client.batch_launch(
            [
                _request("all-MiniLM-L6-v2", cpus_per_task=1),
                _request("broken-chat", cpus_per_task=1),
            ]
        )
        leader = jobs[0].job_id.split("+")[0]
        assert [j.job_id for j in jobs] == [f"{leader}+0", f"{leader}+1"]
        assert {j.batch for j in jobs} == {leader}
        components = controller.cluster.run("squeue", "-h", "-o", "%i").split()
        assert {f"{leader}+0", f"{leader}+1"} <= set(components) or not components  # done already is fine
        script = Path(jobs[0].log_dir, "launch.sbatch").read_text()
        assert script.count("#SBATCH hetjob") == 1 and "--het-group=1" in script
        embed = _follow(controller, f"{leader}+0", SETTLED, READY_TIMEOUT_S)
        assert embed[-1] == JobState.READY, client.log(f"{leader}+0", -3000)[0]
        for job in jobs:
            client.shutdown(job.job_id)
        final = [_follow(controller, j.job_id, ENDED, 120)[-1] for j in jobs]
    assert final[0] == JobState.SHUTDOWN


def test_the_admin_api_wants_its_token_and_unknown_names_are_clear_errors(
    controller: SlurmController,
) -> None:
    with VpoolClient(controller.url, admin_token="wrong") as stranger:
        with pytest.raises(VpoolClientError) as refused:
            stranger.jobs()
    assert refused.value.status == 401
    with controller.client() as client:
        with pytest.raises(VpoolClientError) as unknown:
            client.launch("no-such-model", launcher="slurm")
        assert unknown.value.status == 404 and "vpool list" in unknown.value.message
        with pytest.raises(VpoolClientError) as missing:
            client.status("999999")
        assert missing.value.status == 404


def _request(model: str, **overrides: object) -> LaunchRequest:
    return launch_request(model, "slurm", **overrides)


def _vpool(controller: SlurmController, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**controller.cluster.env(), "VPOOL_CONTROLLER_URL": controller.url, "VPOOL_ADMIN_TOKEN": ADMIN}
    return subprocess.run(
        [sys.executable, "-m", "vpool.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_the_cli_launches_a_local_job_shows_its_metrics_and_shuts_it_down(
    controller: SlurmController, fleet: Fleet
) -> None:
    launched = _vpool(controller, "launch", "slurm-chat", "--launcher", "local", "--json")
    assert launched.returncode == 0, launched.stderr
    job = json.loads(launched.stdout)
    assert job["launcher"] == "local" and job["state"] == "LAUNCHING"
    assert _follow(controller, job["job_id"], SETTLED, READY_TIMEOUT_S)[-1] == JobState.READY
    status = json.loads(_vpool(controller, "status", job["job_id"], "--json").stdout)
    assert status["state"] == "READY" and status["worker_urls"]
    deadline = time.monotonic() + 10
    while _chat(fleet.gateway_url, "slurm-chat").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    metrics = _vpool(controller, "metrics", job["job_id"], "--once", "--json")
    assert metrics.returncode == 0, metrics.stderr
    (worker,) = json.loads(metrics.stdout)["workers"]
    assert worker["successful_requests_total"] >= 1 and worker["generation_tokens_total"] >= 1
    assert "kv_cache_usage" in worker and "generation_throughput" in worker
    listed = json.loads(_vpool(controller, "jobs", "--json").stdout)
    assert job["job_id"] in [j["job_id"] for j in listed]
    assert "registered as" in _vpool(controller, "logs", job["job_id"]).stdout
    assert _vpool(controller, "shutdown", job["job_id"]).returncode == 0
    assert _follow(controller, job["job_id"], ENDED, 120)[-1] == JobState.SHUTDOWN
    unknown = _vpool(controller, "status", "no-such-job", "--json")
    assert unknown.returncode == 2 and json.loads(unknown.stdout)["error"]["status"] == 404
