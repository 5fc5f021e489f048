"""Ray, through its job submission API: `vpool launch --launcher ray` on an existing cluster.

This is the only module that knows Ray's job API. Each vpool job is one Ray job (its
submission id is the vpool job id) whose entrypoint is `vpool worker`: Ray places it on a
node with the GPUs and CPUs it asks for, runs it there, keeps its output, and stops it on
request. The worker registers itself with the controller like any other.

- GPUs: tensor x pipeline parallel size, reserved for the entrypoint (Ray sets its
  CUDA_VISIBLE_DEVICES); none for a CPU model (`gpus_per_node: 0`), and none when the
  engine runs vLLM's Ray executor (`distributed_executor_backend: ray`, several nodes): vLLM
  then reserves TP x PP GPUs itself in a placement group over the cluster, which it could not
  get if the entrypoint held them.
- Stop: `ray job stop` sends SIGTERM to the worker and at once to every process under it,
  vLLM's engine core and its executor's processes included: signalled so, the engine cannot
  finish what it serves. So `vpool shutdown` drains first: the controller takes the worker
  out of routing (DRAINING), waits until its heartbeats show nothing running or waiting (at
  most `controller.launch.shutdown_grace_s`), and only then stops the Ray job; the worker,
  signalled, deregisters and exits. RAY_JOB_STOP_WAIT_TIME_S (Ray's wait before SIGKILL, 3 s
  by default) is set to that grace too, so the worker has time to leave.
- Logs: Ray keeps the entrypoint's output on its head node; the controller copies it into
  the job's `worker.log` when asked for it and when the job ends.

`ray` (the `ray[default]` package, for its job SDK) is imported only when a Ray job is
launched or followed, so a controller that never uses Ray needs none.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from vpool.config import LaunchSettings, ModelSpec
from vpool.controller.slurm import SlurmResources
from vpool.errors import InvalidRequest
from vpool.launch import LaunchRequest
from vpool.registry.records import JobState

T = TypeVar("T")

# Ray-only launch options, by their CLI flag: refused with any other launcher.
RAY_ONLY_OPTIONS = {"ray_address": "--ray-address"}


class RayError(Exception):
    """A Ray job call failed; the message says which and why."""


@dataclass(frozen=True)
class RayJobView:
    """One Ray job as its job API reports it."""

    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in ("STOPPED", "SUCCEEDED", "FAILED")


@dataclass(frozen=True)
class RaySubmission:
    """What one job asks Ray for: the entrypoint, its resources and environment."""

    address: str
    submission_id: str
    argv: list[str]
    num_gpus: float
    num_cpus: float
    env_vars: dict[str, str]

    def script(self) -> str:
        """The same submission as a shell script a person can run again."""
        runtime_env = {"env_vars": self.env_vars}
        argv = [
            "ray", "job", "submit", "--address", self.address, "--no-wait",
            "--entrypoint-num-gpus", f"{self.num_gpus:g}", "--entrypoint-num-cpus", f"{self.num_cpus:g}",
            "--runtime-env-json", json.dumps(runtime_env), "--", shlex.join(self.argv),
        ]  # fmt: skip
        header = "#!/bin/bash\n# Written by vpool; run it again to submit the same worker.\n"
        return header + shlex.join(argv) + "\n"


def check_options(request: LaunchRequest) -> None:
    """Refuse Ray's options on a launch that does not go to Ray."""
    if request.launcher == "ray":
        return
    for field, flag in RAY_ONLY_OPTIONS.items():
        if getattr(request.overrides, field) is not None:
            raise InvalidRequest(
                f"{flag} is for --launcher ray, not {request.launcher}.", param=field, code="ray_only_option"
            )


def resolve_address(request: LaunchRequest, settings: LaunchSettings, environ: Mapping[str, str]) -> str:
    """The cluster a launch goes to: the launch's, the controller's setting, then Ray's own
    environment variables (as `ray job submit` reads them)."""
    address = (
        request.overrides.ray_address
        or settings.ray_address
        or environ.get("RAY_API_SERVER_ADDRESS")
        or environ.get("RAY_ADDRESS")
    )
    if not address:
        raise InvalidRequest(
            "The ray launcher needs the Ray cluster's dashboard address: pass --ray-address "
            "http://HEAD:8265, or set controller.launch.ray_address (or RAY_ADDRESS for the controller).",
            param="ray_address",
            code="no_ray_address",
        )
    return address


def submission(
    address: str,
    job_id: str,
    worker_id: str,
    argv: list[str],
    model: ModelSpec,
    resources: SlurmResources,
    settings: LaunchSettings,
) -> RaySubmission:
    """The Ray job for one worker: the GPUs and CPUs its engine needs (see the module doc)."""
    gpus = model.tensor_parallel_size * model.pipeline_parallel_size
    if resources.gpus_per_node == 0 or model.distributed_executor_backend == "ray":
        gpus = 0
    env = {
        "VPOOL_WORKER_ID": worker_id,
        # The token stays out of the job (Ray's dashboard shows every job's environment):
        # workers read VPOOL_REGISTRATION_TOKEN from the Ray nodes' own environment.
        "RAY_JOB_STOP_WAIT_TIME_S": str(int(settings.shutdown_grace_s)),
    }
    return RaySubmission(address, job_id, argv, gpus, resources.cpus_per_task or 1, env)


def job_state(view: RayJobView | None) -> tuple[JobState, str | None]:
    """A vpool job's state from its Ray job's (None: Ray no longer knows it)."""
    if view is None:
        return JobState.FAILED, "Ray no longer knows this job"
    if view.status == "PENDING":
        return JobState.PENDING, view.message or "waiting for Ray to place it"
    if not view.ended:
        return JobState.LAUNCHING, None
    # Ray's message for a failed entrypoint goes on with its last 20,000 characters of output:
    # the worker's log says that better (the caller quotes its last error).
    message = (view.message or "").split(", last available logs", 1)[0].strip().splitlines()
    return JobState.FAILED, f"Ray: {view.status}" + (f" ({message[0][:300]})" if message else "")


class RayJobs:
    """Ray's job SDK (`JobSubmissionClient`, blocking HTTP) run off the event loop."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s

    async def submit(self, job: RaySubmission) -> None:
        def call(client: Any) -> None:
            client.submit_job(
                entrypoint=shlex.join(job.argv),
                submission_id=job.submission_id,
                entrypoint_num_gpus=job.num_gpus,
                entrypoint_num_cpus=job.num_cpus,
                runtime_env={"env_vars": job.env_vars},
                metadata={"vpool_job": job.submission_id},
            )

        await self._run(job.address, "submit the job", call)

    async def info(self, address: str, submission_id: str) -> RayJobView | None:
        """The job's status, or None when Ray does not know it."""

        def call(client: Any) -> RayJobView | None:
            try:
                details = client.get_job_info(submission_id)
            except RuntimeError as exc:
                if "does not exist" in str(exc):
                    return None
                raise
            return RayJobView(status=str(details.status.value), message=details.message or None)

        return await self._run(address, f"read job {submission_id}", call)

    async def stop(self, address: str, submission_id: str) -> None:
        await self._run(address, f"stop job {submission_id}", lambda client: client.stop_job(submission_id))

    async def logs(self, address: str, submission_id: str) -> str:
        def call(client: Any) -> str:
            return str(client.get_job_logs(submission_id))

        return await self._run(address, f"read job {submission_id}'s log", call)

    async def _run(self, address: str, what: str, call: Callable[[Any], T]) -> T:
        def blocking() -> T:
            return call(_client(address))

        try:
            return await asyncio.wait_for(asyncio.to_thread(blocking), self._timeout_s)
        except TimeoutError:
            raise RayError(f"Ray at {address} did not answer within {self._timeout_s:g} s ({what})") from None
        except RayError:
            raise
        except Exception as exc:  # the SDK raises ConnectionError, RuntimeError, ValueError, ...
            raise RayError(f"could not {what} on Ray at {address}: {_one_line(exc)}") from None


def _client(address: str) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise RayError(
            "the ray launcher needs Ray's job SDK on the controller's host: pip install 'ray[default]'"
        ) from None
    return JobSubmissionClient(address)


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]
