"""`vpool launch --launcher skypilot` as a user runs it, against a controller on a socket.

No cloud is reachable here, so `sky` is a **stand-in**: a small script put first on PATH
that records each call (its arguments, and whether the registration token came in its
environment) and answers as it is told (`sky status -o json` prints a given list of
clusters; a command can be made to fail with a given stderr). The task the controller
writes is read back with SkyPilot's own library (`sky.Task.from_yaml`), from the separate
venv `.sky-venv` (SkyPilot pins click and uvicorn below what vpool runs on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.unit.conftest import Servers, StubFactory, assert_openai_error
from vpool.cli import app
from vpool.config import ControllerSettings, LaunchSettings
from vpool.controller.app import create_controller_app
from vpool.controller.jobs import DRAIN_SETTLE_S
from vpool.controller.skypilot import SkyTask, render_task
from vpool.registry.memory_backend import MemoryRegistry

ROOT = Path(__file__).resolve().parents[2]
SKY_PYTHON = ROOT / ".sky-venv" / "bin" / "python"
TOKEN = "reg-token-s3cret"
CONTROLLER_URL = "http://vpool-controller.example.com:8001"

STAND_IN_SKY = f"""#!{sys.executable}
# A stand-in for SkyPilot's `sky` command (no cloud is reachable in tests).
import json, os, pathlib, sys
state = pathlib.Path(os.environ["SKY_STAND_IN_DIR"])
call = {{"argv": sys.argv[1:], "token": os.environ.get("VPOOL_REGISTRATION_TOKEN")}}
with (state / "calls.jsonl").open("a") as f:
    f.write(json.dumps(call) + "\\n")
command = sys.argv[1]
failure = state / (command + ".fail")
if failure.exists():
    sys.stdout.write("Considered resources (1 node): ...\\n")
    sys.stderr.write(failure.read_text())
    sys.exit(1)
if command == "status":
    status = state / "status.json"
    sys.stdout.write(status.read_text() if status.exists() else "[]")
elif command == "launch":
    print("Launching a new cluster. Proceed? [Y/n]: y")
"""

# What SkyPilot reads back from a task: sky.Task.from_yaml, run in .sky-venv.
READ_TASK = """
import json, sys
import sky
task = sky.Task.from_yaml(sys.argv[1])
(resources,) = task.resources
print(json.dumps({
    "name": task.name,
    "accelerators": resources.accelerators,
    "cloud": str(resources.cloud) if resources.cloud else None,
    "region": resources.region,
    "ports": resources.ports,
    "envs": task.envs,
    "file_mounts": task.file_mounts,
    "storage_mounts": {path: {"source": s.source, "mode": s.mode.value}
                       for path, s in task.storage_mounts.items()},
    "setup": task.setup,
    "run": task.run,
}))
"""


@dataclass
class Cloud:
    """The stand-in `sky`'s state: what it was called with, what it answers."""

    state: Path

    def calls(self) -> list[dict[str, Any]]:
        path = self.state / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def argvs(self, command: str) -> list[list[str]]:
        return [c["argv"] for c in self.calls() if c["argv"][0] == command]

    def wait_for(self, command: str, count: int = 1) -> list[list[str]]:
        deadline = time.monotonic() + 30
        while len(self.argvs(command)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.argvs(command)) >= count, self.calls()
        return self.argvs(command)

    def clusters(self, *clusters: tuple[str, str]) -> None:
        """What `sky status -o json` prints from now on: (name, status) records."""
        records = [
            {"name": name, "status": status, "launched_at": 0, "nodes": 1, "init_status_reason": None}
            for name, status in clusters
        ]
        (self.state / "status.json").write_text(json.dumps(records))

    def fail(self, command: str, stderr: str) -> None:
        (self.state / f"{command}.fail").write_text(stderr)


@dataclass
class Controller:
    url: str
    log_dir: Path


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cloud:
    bin_dir, state = tmp_path / "bin", tmp_path / "sky-state"
    bin_dir.mkdir()
    state.mkdir()
    sky = bin_dir / "sky"
    sky.write_text(STAND_IN_SKY)
    sky.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SKY_STAND_IN_DIR", str(state))
    monkeypatch.delenv("VPOOL_CATALOG", raising=False)
    return Cloud(state)


@pytest.fixture
def controller(servers: Servers, tmp_path: Path) -> Iterator[Controller]:
    log_dir = tmp_path / "jobs"
    settings = ControllerSettings(
        registration_token=TOKEN,
        launch=LaunchSettings(log_dir=log_dir, controller_url=CONTROLLER_URL, poll_interval_s=0.2),
    )
    registry = MemoryRegistry()
    server = servers.serve(create_controller_app(settings, registry))
    yield Controller(server.url, log_dir)
    server.call(registry.close())


def vpool(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def launch(controller: Controller, *args: str) -> dict[str, Any]:
    code, out, err = vpool("launch", "tiny-chat", "--launcher", "skypilot", *args, "--controller",
                           controller.url, "--json")  # fmt: skip
    assert code == 0, out + err
    job: dict[str, Any] = json.loads(out)
    return job


def status(controller: Controller, job_id: str) -> dict[str, Any]:
    code, out, err = vpool("status", job_id, "--controller", controller.url, "--json")
    assert code == 0, out + err
    job: dict[str, Any] = json.loads(out)
    return job


def wait_for_state(controller: Controller, job_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    job = status(controller, job_id)
    while job["state"] != state and time.monotonic() < deadline:
        time.sleep(0.1)
        job = status(controller, job_id)
    assert job["state"] == state, job
    return job


def read_task(path: Path, home: Path) -> dict[str, Any]:
    """The task as SkyPilot's own library reads it."""
    if not SKY_PYTHON.exists():
        pytest.skip(f"SkyPilot is not installed in {SKY_PYTHON.parent.parent} (see scripts/install.sh)")
    home.mkdir(exist_ok=True)
    done = subprocess.run(
        [str(SKY_PYTHON), "-c", READ_TASK, str(path)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(home)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    task: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return task


def test_launch_writes_a_task_skypilot_reads_as_asked_and_runs_sky_launch_on_it(
    controller: Controller, cloud: Cloud, tmp_path: Path
) -> None:
    job = launch(
        controller, "--accelerator", "A100:2", "--cloud", "aws", "--region", "us-east-1",
        "--cluster", "chat-a100", "--env", "HF_HUB_OFFLINE=1", "--env", "NOTE=a=b",
        "--source", "s3://models-bucket/tiny-chat", "--tensor-parallel-size", "2",
    )  # fmt: skip
    assert (job["launcher"], job["state"], job["cluster"]) == ("skypilot", "PENDING", "chat-a100")
    assert job["config"]["accelerator"] == "A100:2" and job["config"]["weights"] == "/vpool/weights"
    task_path = Path(job["log_dir"]) / "sky-task.yaml"

    (launch_argv,) = cloud.wait_for("launch")
    assert launch_argv == [
        "launch", "-c", "chat-a100", "-y", "--detach-run",
        "--secret", "VPOOL_REGISTRATION_TOKEN", str(task_path),
    ]  # fmt: skip
    # The token reaches `sky` through its environment only: never an argument, never the file.
    assert cloud.calls()[0]["token"] == TOKEN
    assert TOKEN not in task_path.read_text()

    task = read_task(task_path, tmp_path / "home")
    assert task["name"] == "chat-a100"
    assert task["accelerators"] == {"A100": 2}
    assert (task["cloud"], task["region"], task["ports"]) == ("AWS", "us-east-1", ["8080"])
    assert task["envs"] == {
        "HF_HUB_OFFLINE": "1", "NOTE": "a=b", "VPOOL_WORKER_ID": job["worker_ids"][0]
    }  # fmt: skip
    assert task["storage_mounts"] == {
        "/vpool/weights": {"source": "s3://models-bucket/tiny-chat", "mode": "MOUNT"}
    }
    assert "uv pip install" in task["setup"] and "'vpool[gpu]" in task["setup"]
    run = task["run"]
    assert "vpool.cli worker --model /vpool/weights --served-name tiny-chat" in run
    assert f"--controller {CONTROLLER_URL}" in run
    assert "--tensor-parallel-size 2" in run and "--port 8080" in run
    assert '--advertise-url "http://${host}:8080"' in run


def test_a_wheel_file_here_is_mounted_onto_the_vm_and_installed_there(tmp_path: Path) -> None:
    wheel = tmp_path / "vpool-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    task = SkyTask(
        name="c1", accelerator="L4", worker_argv=["python", "-m", "vpool.cli", "worker"], install=str(wheel)
    )
    path = tmp_path / "task.yaml"
    path.write_text(render_task(task))
    read = read_task(path, tmp_path / "home")
    assert read["file_mounts"] == {"/tmp/vpool-wheel/vpool-0.1.0-py3-none-any.whl": str(wheel)}
    assert "'vpool[gpu] @ file:///tmp/vpool-wheel/vpool-0.1.0-py3-none-any.whl'" in read["setup"]
    assert read["accelerators"] == {"L4": 1} and read["storage_mounts"] == {}
    assert read["cloud"] is None and read["region"] is None


def test_status_follows_sky_status_to_ready_and_shutdown_runs_sky_down(
    controller: Controller, cloud: Cloud, start_stub: StubFactory
) -> None:
    cloud.clusters(("chat-1", "INIT"))  # as SkyPilot records it once `sky launch` has begun
    job = launch(controller, "--accelerator", "A100:1", "--cluster", "chat-1")
    cloud.wait_for("launch")
    job = wait_for_state(controller, job["job_id"], "PENDING")
    assert "cluster INIT" in (job["reason"] or "")
    assert ["status", "-o", "json", "chat-1"] in cloud.argvs("status")

    cloud.clusters(("chat-1", "UP"), ("someone-elses", "UP"))
    job = wait_for_state(controller, job["job_id"], "LAUNCHING")

    # The worker on the VM registers back (as `vpool worker` does): the job is READY.
    worker = start_stub("tiny-chat")
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            controller.url + "/v1/workers",
            json={"worker_id": job["worker_ids"][0], "url": worker.url, "models": ["tiny-chat"]},
            headers={"authorization": f"Bearer {TOKEN}"},
        )
        assert resp.status_code == 201, resp.text
    job = wait_for_state(controller, job["job_id"], "READY")
    assert job["worker_urls"] == [worker.url]

    worker_id, auth = job["worker_ids"][0], {"authorization": f"Bearer {TOKEN}"}

    def heartbeat(running: int) -> None:  # as the worker on the VM reports its engine's load
        with httpx.Client(timeout=10) as http:
            resp = http.post(
                f"{controller.url}/v1/workers/{worker_id}/heartbeat", json={"running": running}, headers=auth
            )
            assert resp.status_code == 200, resp.text

    heartbeat(running=1)  # a request is in flight when the user asks for the shutdown
    code, out, err = vpool("shutdown", job["job_id"], "--controller", controller.url)
    assert code == 0, err
    assert "shutting down" in out
    with httpx.Client(timeout=10) as http:  # out of routing at once, before the VM goes
        workers = http.get(controller.url + "/v1/workers", headers=auth).json()["data"]
    assert [w["state"] for w in workers if w["worker_id"] == worker_id] == ["DRAINING"]
    time.sleep(DRAIN_SETTLE_S + 1.5)
    assert cloud.argvs("down") == [], "the VM went down while its worker still served a request"
    heartbeat(running=0)  # the request finished
    assert cloud.wait_for("down") == [["down", "-y", "chat-1"]]
    cloud.clusters(("someone-elses", "UP"))  # the cluster is gone
    job = wait_for_state(controller, job["job_id"], "SHUTDOWN")


def test_a_failing_sky_launch_fails_the_job_with_its_last_error_line(
    controller: Controller, cloud: Cloud
) -> None:
    cloud.fail(
        "launch",
        "Traceback (most recent call last):\n  ...\n"
        "sky.exceptions.ResourcesUnavailableError: Failed to provision all possible launchable resources.\n",
    )
    job = launch(controller, "--accelerator", "H100:8")
    job = wait_for_state(controller, job["job_id"], "FAILED")
    assert job["reason"] == (
        "sky launch failed (exit code 1): sky.exceptions.ResourcesUnavailableError: "
        "Failed to provision all possible launchable resources."
    )
    code, out, _ = vpool("status", job["job_id"], "--controller", controller.url)
    assert code == 0 and "FAILED" in out and "ResourcesUnavailableError" in out


def test_a_cluster_that_stops_or_vanishes_fails_the_job(controller: Controller, cloud: Cloud) -> None:
    cloud.clusters(("stops", "STOPPED"))
    stopped = launch(controller, "--accelerator", "A100:1", "--cluster", "stops")
    gone = launch(controller, "--accelerator", "A100:1", "--cluster", "vanishes")
    cloud.wait_for("launch", 2)
    assert wait_for_state(controller, stopped["job_id"], "FAILED")["reason"] == "cluster stops is STOPPED"
    assert (
        wait_for_state(controller, gone["job_id"], "FAILED")["reason"]
        == "SkyPilot knows no cluster vanishes any more"
    )


def test_an_unanswered_sky_status_keeps_the_state_and_says_why(controller: Controller, cloud: Cloud) -> None:
    cloud.clusters(("flaky", "UP"))
    job = launch(controller, "--accelerator", "A100:1", "--cluster", "flaky")
    cloud.wait_for("launch")
    wait_for_state(controller, job["job_id"], "LAUNCHING")
    cloud.fail(
        "status", "sky.exceptions.ApiServerConnectionError: Could not connect to SkyPilot API server\n"
    )
    job = status(controller, job["job_id"])
    assert job["state"] == "LAUNCHING"
    assert "Could not connect to SkyPilot API server" in job["reason"]


def test_replicas_get_a_cluster_each(controller: Controller, cloud: Cloud) -> None:
    code, out, err = vpool("launch", "tiny-chat", "--launcher", "skypilot", "--accelerator", "T4",
                           "--cluster", "chat", "--replicas", "2",
                           "--controller", controller.url, "--json")  # fmt: skip
    assert code == 0, err
    assert sorted(j["cluster"] for j in json.loads(out)) == ["chat-0", "chat-1"]
    assert sorted(argv[2] for argv in cloud.wait_for("launch", 2)) == ["chat-0", "chat-1"]


def test_without_sky_installed_a_launch_is_502_and_the_cli_says_so_in_one_line(
    controller: Controller, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    body = {"model": "tiny-chat", "launcher": "skypilot", "overrides": {"accelerator": "A100:1"}}
    with httpx.Client(timeout=10) as http:
        error = assert_openai_error(http.post(controller.url + "/admin/v1/jobs", json=body), 502)
    assert error["code"] == "launch_failed"
    assert "`sky` is not installed" in error["message"] and "pip install 'skypilot[aws]'" in error["message"]
    code, out, err = vpool("launch", "tiny-chat", "--launcher", "skypilot", "--accelerator", "A100:1",
                           "--controller", controller.url)  # fmt: skip
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "`sky` is not installed" in err


@pytest.mark.parametrize(
    ("body", "param", "code", "words"),
    [
        ({"launcher": "skypilot", "overrides": {"accelerator": "A100:two"}}, "overrides.accelerator", None,
         "NAME[:COUNT]"),
        ({"launcher": "skypilot", "overrides": {"accelerator": "A100", "source": "/data/weights"}},
         "overrides.source", None, "object-store URL"),
        ({"launcher": "skypilot", "overrides": {"accelerator": "A100", "source": "http://example.com/w"}},
         "overrides.source", None, "object-store URL"),
        ({"launcher": "skypilot", "overrides": {"accelerator": "A100", "envs": {"NOT-A-NAME": "1"}}},
         "overrides.envs", None, "not an environment variable name"),
        ({"launcher": "skypilot", "overrides": {}}, "accelerator", "no_accelerator", "needs --accelerator"),
        ({"launcher": "skypilot", "overrides": {"accelerator": "A100", "partition": "gpu"}}, "partition",
         "not_a_skypilot_option", "--partition is not an option of --launcher skypilot"),
        ({"launcher": "slurm", "overrides": {"cloud": "aws"}}, "cloud", "skypilot_only_option",
         "--cloud is for --launcher skypilot, not slurm"),
        ({"launcher": "local", "overrides": {"source": "s3://b/w"}}, "source", "skypilot_only_option",
         "--source is for --launcher skypilot, not local"),
        ({"launcher": "skypilot", "overrides": {"accelerator": "A100:1", "tensor_parallel_size": 2}},
         "accelerator", "too_few_accelerators", "2 GPUs: --accelerator A100:1 gives 1"),
    ],
)  # fmt: skip
def test_bad_skypilot_launches_are_400_and_start_nothing(
    controller: Controller, cloud: Cloud, body: dict[str, Any], param: str, code: str | None, words: str
) -> None:
    with httpx.Client(timeout=10) as http:
        error = assert_openai_error(
            http.post(controller.url + "/admin/v1/jobs", json={"model": "tiny-chat", **body}), 400
        )
    assert error["param"] == param and words in error["message"]
    if code:
        assert error["code"] == code
    assert cloud.calls() == []
    assert not list(controller.log_dir.glob("*/*/sky-task.yaml"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--accelerator", "A100:x"], "accelerator: an accelerator is NAME[:COUNT]"),
        (["--accelerator", "A100", "--env", "NOVALUE"], "--env expects KEY=VALUE, got `NOVALUE`"),
        (
            ["--accelerator", "A100", "--source", "/data"],
            "source: the weights' source must be an object-store URL",
        ),
    ],
)
def test_the_cli_refuses_malformed_skypilot_options_in_one_line(
    controller: Controller, cloud: Cloud, args: list[str], words: str
) -> None:
    code, out, err = vpool(
        "launch", "tiny-chat", "--launcher", "skypilot", *args, "--controller", controller.url
    )
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and words in err
    assert cloud.calls() == []


def test_the_cli_passes_on_the_controllers_refusal_of_slurm_options(
    controller: Controller, cloud: Cloud
) -> None:
    code, out, err = vpool("launch", "tiny-chat", "--launcher", "skypilot", "--accelerator", "A100",
                           "--partition", "gpu", "--controller", controller.url)  # fmt: skip
    assert code == 2 and out == ""
    assert "--partition is not an option of --launcher skypilot" in err
    code, out, _ = vpool("launch", "tiny-chat", "--launcher", "slurm", "--region", "us-east-1",
                         "--controller", controller.url, "--json")  # fmt: skip
    assert code == 2
    assert json.loads(out)["error"]["message"] == "--region is for --launcher skypilot, not slurm."
    assert cloud.calls() == []
