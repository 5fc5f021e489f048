"""Slurm, through its own commands: the sbatch script, `sbatch`, `scontrol`, `scancel`.

This is the only module that knows Slurm. It needs no accounting (`sacct`): a job's state
and reason come from `scontrol show job`, which knows pending, running and recently ended
jobs (for `MinJobAge`, 300 s by default, after they end).

A job is submitted held (`sbatch --hold`), so that its log directory, named after the job
id, exists before the job can start; then it is released.

Scripts:
- one node: `exec` the worker, so that `scancel --signal=TERM --batch` reaches it and it
  drains before it exits;
- several nodes: a Ray cluster over the job's nodes (the head on the first), then the
  worker with vLLM's Ray executor: tensor parallel inside a node, pipeline parallel across
  nodes, as vLLM's distributed serving guide does;
- a heterogeneous job (`vpool batch-launch`): one component per model, each worker started
  with `srun --het-group=N`; nothing starts until every component is allocated.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

RAY_PORT = 6379


class SlurmError(Exception):
    """A Slurm command failed; the message is its own."""


@dataclass(frozen=True)
class SlurmResources:
    partition: str | None = None
    qos: str | None = None
    time: str | None = None
    num_nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None

    def directives(self) -> list[str]:
        """`#SBATCH` options for one job or one component of a heterogeneous job."""
        lines = [f"--nodes={self.num_nodes}", "--ntasks-per-node=1"]
        for flag, value in (
            ("partition", self.partition),
            ("qos", self.qos),
            ("time", self.time),
            ("cpus-per-task", self.cpus_per_task),
            ("mem", self.mem),
            ("account", self.account),
        ):
            if value not in (None, ""):
                lines.append(f"--{flag}={value}")
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        return lines


@dataclass(frozen=True)
class ScriptPart:
    """One model of a script: its resources and the worker command line (argv)."""

    name: str
    resources: SlurmResources
    worker_argv: list[str]
    log_path: str  # the worker's output; %j is the job id


def render_script(job_name: str, parts: Sequence[ScriptPart], python: str) -> str:
    """The sbatch script for one model (`parts` of one) or a heterogeneous job."""
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}"]
    for i, part in enumerate(parts):
        if i:
            lines.append("#SBATCH hetjob")
        lines += [f"#SBATCH {d}" for d in part.resources.directives()]
        if i == 0:
            lines.append(f"#SBATCH --output={part.log_path}")
    lines += [
        "# Written by vpool; `sbatch` this file again to run the same job.",
        "set -euo pipefail",
        'echo "vpool job $SLURM_JOB_ID on $(hostname)"',
    ]
    if len(parts) > 1:
        for i, part in enumerate(parts):
            argv = " ".join(shlex.quote(a) for a in part.worker_argv)
            # srun's own %j would be the component's id: the leader's, from the batch step.
            output = '"${SLURM_JOB_ID}"'.join(shlex.quote(piece) for piece in part.log_path.split("%j"))
            lines.append(f"srun --overlap --het-group={i} --output={output} {argv} &")
        lines.append("wait")
        return "\n".join(lines) + "\n"
    (part,) = parts
    argv = " ".join(shlex.quote(a) for a in part.worker_argv)
    if part.resources.num_nodes > 1:
        lines += _ray_cluster(python)
    lines.append(f"exec {argv}")
    return "\n".join(lines) + "\n"


def _ray_cluster(python: str) -> list[str]:
    ray = f"{shlex.quote(python)} -m ray.scripts.scripts"
    return [
        "# A Ray cluster over the job's nodes: the head here, one Ray worker per other node.",
        'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
        "head=${nodes[0]}",
        'head_ip=$(srun --overlap --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | cut -d" " -f1)',
        f'srun --overlap --nodes=1 --ntasks=1 -w "$head" {ray} start --head --node-ip-address="$head_ip"'
        f" --port={RAY_PORT} --block &",
        "sleep 10",
        'for node in "${nodes[@]:1}"; do',
        f'  srun --overlap --nodes=1 --ntasks=1 -w "$node" {ray} start --address="$head_ip:{RAY_PORT}"'
        " --block &",
        "done",
        "sleep 10",
        f'export RAY_ADDRESS="$head_ip:{RAY_PORT}"',
    ]


@dataclass
class SlurmJob:
    """One job (or one component of a heterogeneous job) as `scontrol` reports it."""

    job_id: str  # "123", or "123+1" for a component
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str | None  # Slurm's "None" (no reason) is None
    exit_code: str = ""
    nodes: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")


def parse_scontrol(text: str) -> dict[str, SlurmJob]:
    """`scontrol show job -o` output (one line per job or component) by job id."""
    jobs: dict[str, SlurmJob] = {}
    for line in text.splitlines():
        if "JobId=" not in line:
            continue
        fields = dict(token.split("=", 1) for token in line.split() if "=" in token)
        job_id = fields["JobId"]
        if "HetJobOffset" in fields and fields.get("HetJobId"):
            job_id = f"{fields['HetJobId']}+{fields['HetJobOffset']}"
        jobs[job_id] = SlurmJob(
            job_id=job_id,
            state=fields.get("JobState", "UNKNOWN"),
            reason=None if fields.get("Reason", "None") == "None" else fields["Reason"],
            exit_code=fields.get("ExitCode", ""),
            nodes=fields.get("NodeList", ""),
            fields=fields,
        )
    return jobs


class Slurm:
    """Runs Slurm's commands (found on PATH; `SLURM_CONF` is passed on from the environment)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s

    async def submit(self, script_path: str, hold: bool = True) -> str:
        """The job id `sbatch --parsable` gives (a heterogeneous job: its leader's)."""
        args = ["sbatch", "--parsable", *(["--hold"] if hold else []), script_path]
        out = await self._run(args)
        return out.strip().split(";", 1)[0]

    async def release(self, job_id: str) -> None:
        await self._run(["scontrol", "release", job_id])

    async def query(self, job_ids: Sequence[str]) -> dict[str, SlurmJob]:
        """What Slurm knows of these jobs (leaders of heterogeneous jobs list all components);
        a job Slurm has forgotten is missing from the result."""
        found: dict[str, SlurmJob] = {}
        for leader in sorted({j.split("+", 1)[0] for j in job_ids}):
            try:
                found.update(parse_scontrol(await self._run(["scontrol", "show", "job", "-o", leader])))
            except SlurmError as exc:
                if "Invalid job id" not in str(exc):
                    raise
        return found

    async def signal(self, job_id: str, signal: str = "TERM") -> None:
        """Send `signal` to the job's batch step: its worker drains, then the job ends."""
        await self._run(["scancel", f"--signal={signal}", "--batch", job_id.split("+", 1)[0]])

    async def cancel(self, job_id: str) -> None:
        await self._run(["scancel", job_id.split("+", 1)[0]])

    async def _run(self, argv: list[str]) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            raise SlurmError(f"`{argv[0]}` is not installed here: Slurm's commands are needed") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._timeout_s)
        except TimeoutError:
            proc.kill()
            raise SlurmError(f"`{' '.join(argv)}` did not answer within {self._timeout_s:g} s") from None
        if proc.returncode != 0:
            message = (err or out).decode(errors="replace").strip()
            raise SlurmError(f"`{' '.join(argv)}` failed: {message}")
        return out.decode(errors="replace")
