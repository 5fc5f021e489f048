"""Launched jobs: started through a launcher, followed until they serve, stopped on request.

One job is one worker (a launch with `replicas: N` makes N jobs). Its record lives in the
registry (durable), its files in LOG_DIR/FAMILY/NAME.JOB/: the script that started it
(`launch.sbatch` or `launch.sh`), `launch.json` (the config, the worker's URL added once
READY) and `worker.log`.

States, read again every `poll_interval_s` from the launcher and the registry:

    PENDING    queued (Slurm's reason: Resources, Priority, JobHeldUser, ...)
    LAUNCHING  running; the engine loads, the worker has not registered READY yet
    READY      its worker is READY in the registry: the gateway serves it
    FAILED     it ended without being asked to, with the reason (exit code, the log's last error)
    SHUTDOWN   it ended after `vpool shutdown`
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from vpool.catalog.catalog import Catalog
from vpool.config import ControllerSettings, ModelSpec
from vpool.controller import skypilot
from vpool.controller.job_spec import JobSpec, resolve
from vpool.controller.ray_jobs import (
    RayError,
    RayJobs,
    check_options,
    job_state,
    resolve_address,
    submission,
)
from vpool.controller.skypilot import SkyPilotError, SkyPilotJobs
from vpool.controller.slurm import ScriptPart, Slurm, SlurmError, SlurmJob, render_script
from vpool.controller.worker_metrics import WorkerMetrics, read_worker_metrics
from vpool.errors import InvalidRequest, NotFound, VpoolError
from vpool.launch import BatchLaunchRequest, LaunchRequest
from vpool.registry.protocol import Registry, RegistryUnavailable
from vpool.registry.records import JobRecord, JobState, WorkerState

log = logging.getLogger("vpool.jobs")

WORKER_LOG = "worker.log"
# `vpool shutdown` of a Ray or SkyPilot job: how long its worker is DRAINING before its load
# is trusted to be final (gateways see the change on their next fleet refresh; the worker's
# own drain waits as long).
DRAIN_SETTLE_S = 2.0
LOG_CHUNK_BYTES = 256 * 1024


class JobNotFound(NotFound):
    default_code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"There is no job {job_id}.", param="job_id")


class LaunchFailed(VpoolError):
    status_code = 502
    error_type = "launch_error"
    default_code = "launch_failed"


def worker_argv(python: str, model: ModelSpec, controller_url: str, cache_dir: Path) -> list[str]:
    """`vpool worker` for one job, with flags a person can read (and rerun)."""
    argv = [python, "-m", "vpool.cli", "worker", "--model", model.model, "--served-name", model.name]
    argv += ["--runner", model.runner, "--dtype", model.dtype]
    argv += ["--tensor-parallel-size", str(model.tensor_parallel_size)]
    argv += ["--pipeline-parallel-size", str(model.pipeline_parallel_size)]
    if model.max_model_len:
        argv += ["--max-model-len", str(model.max_model_len)]
    if model.distributed_executor_backend:
        argv += ["--distributed-executor-backend", model.distributed_executor_backend]
    for key, value in model.engine_args.items():
        argv += ["--engine-arg", f"{key}={_flag_value(value)}"]
    argv += [
        "--controller",
        controller_url,
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--cache-dir",
        str(cache_dir),
    ]
    return argv


class JobManager:
    """The controller's launches: `launch`, `refresh`, `shutdown`, logs and metrics."""

    def __init__(
        self,
        settings: ControllerSettings,
        registry: Registry,
        catalog: Callable[[], Catalog],
        http: httpx.AsyncClient,
        slurm: Slurm | None = None,
        ray: RayJobs | None = None,
        sky: SkyPilotJobs | None = None,
    ) -> None:
        self._settings = settings
        self._launch = settings.launch
        self._registry = registry
        self._catalog = catalog
        self._http = http
        self._slurm = slurm or Slurm()
        self._ray = ray or RayJobs()
        self._sky = sky or SkyPilotJobs()
        self._local: dict[str, subprocess.Popen[bytes]] = {}
        self.owner = f"{socket.getfqdn()}:{settings.port}"
        self._lock = asyncio.Lock()  # one state change per job at a time
        # Ray and SkyPilot jobs waiting for their worker to drain before they are stopped.
        self._stopping: set[asyncio.Task[None]] = set()

    # launching

    async def launch(self, request: LaunchRequest) -> list[JobRecord]:
        """One job per replica of the model the request names."""
        check_options(request)
        skypilot.check_options(request)
        spec = resolve(request, self._catalog, self._launch)
        jobs: list[JobRecord] = []
        for replica in range(spec.replicas):
            if request.launcher == "slurm":
                jobs += await self._submit_slurm([spec])
            elif request.launcher == "skypilot":
                jobs.append(await self._launch_skypilot(spec, request, replica))
            elif request.launcher == "ray":
                jobs.append(await self._submit_ray(spec, resolve_address(request, self._launch, os.environ)))
            else:
                jobs.append(await self._start_local(spec))
        return jobs

    async def batch_launch(self, request: BatchLaunchRequest) -> list[JobRecord]:
        specs = []
        for item in request.models:
            check_options(item)
            if item.launcher != "slurm":
                raise InvalidRequest("A batch launch is one Slurm heterogeneous job: use the slurm launcher.")
            specs.append(resolve(item, self._catalog, self._launch))
        return await self._submit_slurm(specs)

    def _job_dir(self, spec: JobSpec, job_id: str) -> Path:
        path = self._family_dir(spec) / f"{spec.entry.name}.{job_id}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _family_dir(self, spec: JobSpec) -> Path:
        return self._launch.log_dir / (spec.entry.family or "custom")

    def _controller_url(self) -> str:
        if self._launch.controller_url:
            return self._launch.controller_url.rstrip("/")
        host = self._settings.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"http://{host}:{self._settings.port}"

    def _cache_dir(self) -> Path:
        return self._launch.log_dir / "cache"

    async def _start_local(self, spec: JobSpec) -> JobRecord:
        job_id = f"local-{uuid.uuid4().hex[:8]}"
        job_dir = self._job_dir(spec, job_id)
        worker_id = f"{spec.entry.name}-{job_id}"
        argv = worker_argv(self._launch.python, spec.model, self._controller_url(), self._cache_dir())
        (job_dir / "launch.sh").write_text(
            "#!/bin/bash\n# Written by vpool; run it again to start the same worker.\n"
            f"export VPOOL_WORKER_ID={shlex.quote(worker_id)}\nexec {shlex.join(argv)}\n"
        )
        env = {**os.environ, "VPOOL_WORKER_ID": worker_id}
        if self._settings.registration_token:
            env["VPOOL_REGISTRATION_TOKEN"] = self._settings.registration_token
        with (job_dir / WORKER_LOG).open("ab") as out:
            # Starting a process is a fork and an exec: nothing here waits on it.
            process = subprocess.Popen(  # noqa: ASYNC220
                argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self._local[job_id] = process
        job = JobRecord(
            job_id=job_id,
            launcher="local",
            model=spec.entry.name,
            state=JobState.LAUNCHING,
            config={**spec.config, "pid": process.pid},
            worker_ids=[worker_id],
            log_dir=str(job_dir),
        )
        return await self._save(job)

    async def _submit_ray(self, spec: JobSpec, address: str) -> JobRecord:
        """One Ray job running `vpool worker` where Ray finds the GPUs it asks for."""
        job_id = f"ray-{uuid.uuid4().hex[:8]}"
        worker_id = f"{spec.entry.name}-{job_id}"
        argv = worker_argv(self._launch.python, spec.model, self._controller_url(), self._cache_dir())
        job = submission(address, job_id, worker_id, argv, spec.model, spec.resources, self._launch)
        try:
            await self._ray.submit(job)
        except RayError as exc:
            raise LaunchFailed(str(exc)) from None
        job_dir = self._job_dir(spec, job_id)
        (job_dir / "launch.sh").write_text(job.script())
        config = {**spec.config, "ray_address": address, "num_gpus": job.num_gpus, "num_cpus": job.num_cpus}
        record = JobRecord(
            job_id=job_id,
            launcher="ray",
            model=spec.entry.name,
            state=JobState.PENDING,
            config=config,
            worker_ids=[worker_id],
            log_dir=str(job_dir),
        )
        return await self._save(record)

    async def _launch_skypilot(self, spec: JobSpec, request: LaunchRequest, replica: int) -> JobRecord:
        """One SkyPilot cluster running the worker; `sky launch` goes on in the background."""
        o = request.overrides
        job_id = f"sky-{uuid.uuid4().hex[:8]}"
        worker_id = f"{spec.entry.name}-{job_id}"
        model = skypilot.model_on_vm(spec.model, spec.entry.model, o.accelerator or "", o.source)
        argv = worker_argv("python", model, self._controller_url(), Path(skypilot.VM_CACHE_DIR))
        task = skypilot.job_task(
            job_id, worker_id, argv, o, replica, spec.replicas, self._launch.skypilot_install
        )
        job_dir = self._job_dir(spec, job_id)
        try:
            self._sky.launch(task, job_dir, self._settings.registration_token)
        except SkyPilotError as exc:
            raise LaunchFailed(str(exc)) from None
        job = JobRecord(
            job_id=job_id,
            launcher="skypilot",
            model=spec.entry.name,
            state=JobState.PENDING,
            reason="sky launch: provisioning",
            config={**spec.config, "weights": model.model, **skypilot.task_config(task)},
            worker_ids=[worker_id],
            log_dir=str(job_dir),
            cluster=task.name,
        )
        return await self._save(job)

    async def _submit_slurm(self, specs: list[JobSpec]) -> list[JobRecord]:
        staging = self._launch.log_dir / "staging"
        staging.mkdir(parents=True, exist_ok=True)
        hetero = len(specs) > 1
        controller = self._controller_url()
        # The directory is LOG_DIR/FAMILY/NAME.JOB: %j in the script, the real id once known.
        parts = [
            ScriptPart(
                name=spec.entry.name,
                resources=spec.resources,
                worker_argv=worker_argv(self._launch.python, spec.model, controller, self._cache_dir()),
                log_path=str(self._family_dir(spec) / f"{spec.entry.name}.%j" / WORKER_LOG),
            )
            for spec in specs
        ]
        names = "+".join(spec.entry.name for spec in specs)
        script = render_script(f"vpool-{names}", parts, self._launch.python)
        script = _with_worker_ids(script, [spec.entry.name for spec in specs])
        script_path = staging / f"{uuid.uuid4().hex}.sbatch"
        script_path.write_text(script)
        try:
            leader = await self._slurm.submit(str(script_path), hold=True)
        except SlurmError as exc:
            raise LaunchFailed(str(exc)) from None
        jobs = []
        for i, (spec, part) in enumerate(zip(specs, parts, strict=True)):
            job_id = f"{leader}+{i}" if hetero else leader
            job_dir = self._job_dir(spec, leader)
            if hetero:  # each component logs under its own directory, named after the leader
                part_log = part.log_path.replace("%j", leader)
                script = script.replace(part.log_path, part_log)
            jobs.append(
                JobRecord(
                    job_id=job_id,
                    launcher="slurm",
                    model=spec.entry.name,
                    state=JobState.PENDING,
                    config=spec.config,
                    worker_ids=[_slurm_worker_id(spec.entry.name, leader, i if hetero else None)],
                    log_dir=str(job_dir),
                    batch=leader if hetero else None,
                )
            )
        for job in jobs:
            (Path(job.log_dir) / "launch.sbatch").write_text(script)
        script_path.unlink(missing_ok=True)
        try:
            await self._slurm.release(leader)
        except SlurmError as exc:
            raise LaunchFailed(str(exc)) from None
        return [await self._save(job) for job in jobs]

    # following

    async def get(self, job_id: str) -> JobRecord:
        job = await self._registry.get_job(job_id)
        if job is None:
            raise JobNotFound(job_id)
        if job.cluster:
            self._sky.forget_status(job.cluster)  # asked for: read SkyPilot's word afresh
        return await self.refresh(job)

    async def list_all(self) -> list[JobRecord]:
        return [await self.refresh(job) for job in await self._registry.list_jobs()]

    async def run(self) -> None:
        """Keep every unfinished job's state current (the background loop)."""
        while True:
            await asyncio.sleep(self._launch.poll_interval_s)
            with contextlib.suppress(Exception):  # a registry or Slurm hiccup: next round
                for job in await self._registry.list_jobs():
                    if not job.state.finished:
                        await self.refresh(job)

    async def refresh(self, job: JobRecord) -> JobRecord:
        if job.state.finished:
            return job
        if job.controller and job.controller != self.owner:
            return job  # another controller's: it follows it
        async with self._lock:
            # Read again under the lock: another caller may have moved it on meanwhile.
            job = await self._registry.get_job(job.job_id) or job
            if job.state.finished:
                return job
            state, reason = await self._scheduler_view(job)
            if state == JobState.LAUNCHING:
                urls = await self._ready_worker_urls(job)
                if urls:
                    state, job.worker_urls = JobState.READY, urls
            if state.finished and job.shutdown_requested_at is not None:
                state, reason = JobState.SHUTDOWN, None
            elif state == JobState.FAILED:
                reason = _with_log_reason(reason, Path(job.log_dir) / WORKER_LOG)
            if (state, reason) != (job.state, job.reason):
                log.info("job %s (%s): %s -> %s %s", job.job_id, job.model, job.state, state, reason or "")
                job.state, job.reason, job.updated_at = state, reason, time.time()
                await self._save(job)
            return job

    async def _scheduler_view(self, job: JobRecord) -> tuple[JobState, str | None]:
        if job.launcher == "local":
            process = self._local.get(job.job_id)
            if process is None:
                return JobState.FAILED, "its controller restarted: local workers end with it"
            code = process.poll()
            if code is None:
                return JobState.LAUNCHING, None
            return JobState.FAILED, f"the worker exited with code {code}"
        if job.launcher == "skypilot":
            return await self._sky.view(job)
        if job.launcher == "ray":
            try:
                view = await self._ray.info(job.config["ray_address"], job.job_id)
            except RayError as exc:
                log.warning("could not read job %s from Ray: %s", job.job_id, exc)
                return job.state, job.reason  # unchanged until Ray answers again
            if view is not None and view.ended:
                await self._copy_ray_log(job)  # the reason quotes its last error
            return job_state(view)
        try:
            found = await self._slurm.query([job.job_id])
        except SlurmError as exc:
            log.warning("could not read job %s from Slurm: %s", job.job_id, exc)
            return job.state, job.reason  # unchanged until Slurm answers again
        slurm_job: SlurmJob | None = found.get(job.job_id)
        if slurm_job is None:
            return JobState.FAILED, "Slurm no longer knows this job"
        if slurm_job.state == "PENDING":
            return JobState.PENDING, slurm_job.reason
        if not slurm_job.ended:
            return JobState.LAUNCHING, None
        return (
            JobState.FAILED,
            f"Slurm: {slurm_job.state} (exit code {slurm_job.exit_code}, reason {slurm_job.reason})",
        )

    async def _ready_worker_urls(self, job: JobRecord) -> list[str]:
        records = {r.worker_id: r for r in await self._registry.list_workers()}
        ready = [records[w] for w in job.worker_ids if w in records and records[w].state == WorkerState.READY]
        return [r.url for r in ready] if len(ready) == len(job.worker_ids) else []

    # stopping

    async def shutdown(self, job_id: str) -> JobRecord:
        """Ask the job's worker to drain and leave; a job not started yet is cancelled."""
        job = await self.get(job_id)
        if job.state.finished:
            return job
        job.shutdown_requested_at = time.time()
        await self._save(job)
        if job.launcher == "local":
            process = self._local.get(job.job_id)
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                asyncio.get_running_loop().call_later(self._launch.shutdown_grace_s, _kill_group, process)
        elif job.launcher in ("skypilot", "ray"):
            # `sky down` takes the VM away and Ray's stop signals the engine's processes too:
            # out of routing first, stopped once idle.
            for worker_id in job.worker_ids:
                await self._registry.set_state(worker_id, WorkerState.DRAINING, self._launch.shutdown_grace_s)
            stopping = asyncio.create_task(self._stop_when_idle(job))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)
        else:
            try:
                if job.state == JobState.PENDING:
                    await self._slurm.cancel(job.job_id)
                else:
                    await self._slurm.signal(job.job_id, "TERM")
            except SlurmError as exc:
                raise LaunchFailed(str(exc)) from None
        return job

    async def _stop_when_idle(self, job: JobRecord) -> None:
        """Stop a Ray job or a SkyPilot cluster once its worker, out of routing, runs nothing
        (or the grace is up): neither lets the worker drain by itself."""
        deadline = time.monotonic() + self._launch.shutdown_grace_s
        await asyncio.sleep(DRAIN_SETTLE_S)
        while time.monotonic() < deadline:
            try:
                records = {r.worker_id: r for r in await self._registry.list_workers()}
            except RegistryUnavailable:
                records = None  # unknown: wait on
            if records is not None and all(
                records[w].load.running + records[w].load.waiting == 0 for w in job.worker_ids if w in records
            ):
                break
            await asyncio.sleep(0.5)
        try:
            if job.launcher == "skypilot":
                self._sky.shutdown(job)
            else:
                await self._ray.stop(job.config["ray_address"], job.job_id)
        except (RayError, SkyPilotError) as exc:
            log.warning("could not stop job %s (`vpool shutdown` tries again): %s", job.job_id, exc)

    async def stop_local(self) -> None:
        """The controller stops: its local workers drain and exit with it."""
        for process in self._local.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in self._local.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for process in self._local.values():
            _kill_group(process)

    # reading

    async def read_log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        """The worker's log from `offset` (negative: that many bytes from the end), and the
        offset to read on from."""
        job = await self.get(job_id)
        if job.launcher == "ray":
            await self._copy_ray_log(job)
        path = Path(job.log_dir) / WORKER_LOG
        if not path.exists():
            return "", 0
        size = path.stat().st_size
        start = max(0, size + offset) if offset < 0 else min(offset, size)
        with path.open("rb") as f:
            f.seek(start)
            data = f.read(LOG_CHUNK_BYTES)
        return data.decode(errors="replace"), start + len(data)

    async def metrics(self, job_id: str) -> list[WorkerMetrics]:
        job = await self.get(job_id)
        if job.state != JobState.READY:
            raise InvalidRequest(f"Job {job_id} is {job.state.value}: metrics come once it is READY.")
        return list(await asyncio.gather(*(read_worker_metrics(self._http, url) for url in job.worker_urls)))

    async def _copy_ray_log(self, job: JobRecord) -> None:
        """Ray keeps a job's output on its head node: copy it into the job's worker.log."""
        try:
            text = await self._ray.logs(job.config["ray_address"], job.job_id)
        except RayError as exc:
            log.warning("could not read job %s's log from Ray: %s", job.job_id, exc)
            return
        with contextlib.suppress(OSError):
            (Path(job.log_dir) / WORKER_LOG).write_text(text)

    async def _save(self, job: JobRecord) -> JobRecord:
        job.controller = job.controller or self.owner
        await self._registry.put_job(job)
        launch = {
            "job_id": job.job_id,
            "state": job.state.value,
            "config": job.config,
            "workers": job.worker_urls,
        }
        with contextlib.suppress(OSError):
            (Path(job.log_dir) / "launch.json").write_text(json.dumps(launch, indent=2, default=str))
        return job


def _flag_value(value: object) -> str:
    """An engine arg as `--engine-arg KEY=VALUE` reads it back (a YAML scalar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _slurm_worker_id(name: str, leader: str, component: int | None) -> str:
    return f"{name}-{leader}" if component is None else f"{name}-{leader}-c{component}"


def _with_worker_ids(script: str, names: list[str]) -> str:
    """Give each worker its registry id from Slurm's job id (known only when the job runs)."""
    lines = script.splitlines()
    out = []
    het = len(names) > 1
    component = 0
    for line in lines:
        if line.startswith("exec ") and not het:
            out.append(f'export VPOOL_WORKER_ID="{names[0]}-${{SLURM_JOB_ID}}"')
        elif line.startswith("srun --overlap --het-group="):
            line = f'VPOOL_WORKER_ID="{names[component]}-${{SLURM_JOB_ID}}-c{component}" {line}'
            component += 1
        out.append(line)
    return "\n".join(out) + "\n"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _with_log_reason(reason: str | None, log_path: Path) -> str:
    """The scheduler's reason, and what the worker's log says last went wrong."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "invalid" in ln.lower()]
    last = (errors or lines or [""])[-1][:500]
    return f"{reason}; the worker's log: {last}" if last else reason or "ended"
