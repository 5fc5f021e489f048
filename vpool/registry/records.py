"""What the registry stores about a worker: pydantic records shared by every process."""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


class WorkerState(StrEnum):
    """LAUNCHING → READY → DRAINING → GONE, or FAILED. Only READY workers get traffic."""

    LAUNCHING = "LAUNCHING"
    READY = "READY"
    DRAINING = "DRAINING"
    FAILED = "FAILED"
    GONE = "GONE"


class WorkerLoad(BaseModel):
    """Read from the engine itself and carried by every heartbeat."""

    running: int = Field(0, ge=0)
    waiting: int = Field(0, ge=0)
    kv_cache_usage: float = Field(0.0, ge=0.0, le=1.0)
    # The engine's prefix cache since it started, in prompt tokens (vLLM's
    # `vllm:prefix_cache_queries` and `vllm:prefix_cache_hits`): cumulative, so a reader takes
    # rates over any window it likes. 0 and 0 where the engine reports none (an external
    # server, prefix caching off, an older worker).
    prefix_cache_queries: int = Field(0, ge=0)
    prefix_cache_hits: int = Field(0, ge=0)


class WorkerInfo(BaseModel):
    """What a worker is, as it registers: fixed for its life."""

    worker_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")
    url: str = Field(min_length=1, pattern=r"^https?://")
    # Served names: the first is the primary one, the rest are aliases.
    models: list[str] = Field(min_length=1)
    model_path: str = ""
    runner: Literal["generate", "pooling"] = "generate"
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    # The longest context the engine takes (prompt plus output), where the worker reports it:
    # gateways show it in `/v1/models`.
    max_model_len: int | None = Field(None, ge=1)
    # The most requests its engine runs at once (vLLM's `max_num_seqs`), where the worker
    # reports it: past it, gateways queue requests per key (vpool/gateway/fair_share.py).
    max_num_seqs: int | None = Field(None, ge=1)
    # "external": a server vpool did not start; the controller heartbeats for it.
    kind: Literal["vpool", "external"] = "vpool"


class WorkerRecord(WorkerInfo):
    """A worker as the registry holds it: identity plus state, liveness and load."""

    state: WorkerState = WorkerState.LAUNCHING
    registered_at: float = Field(default_factory=time.time)
    last_heartbeat: float = Field(default_factory=time.time)
    load: WorkerLoad = Field(default_factory=WorkerLoad)


class GatewayRecord(BaseModel):
    """A gateway as it announces itself, for discovery (Prometheus scrapes it): soft state,
    refreshed from the gateway's fleet refresh and gone when its TTL runs out."""

    url: str = Field(min_length=1, pattern=r"^https?://")  # where others reach it; its identity
    announced_at: float = Field(default_factory=time.time)


class Registration(WorkerInfo):
    """What a worker (or an admin adding an external server) tells the controller."""


class RegistrationAccepted(BaseModel):
    worker_id: str
    heartbeat_interval_s: float
    ttl_s: float


class JobState(StrEnum):
    """A launched job: PENDING (queued) → LAUNCHING (running, engine loading) → READY
    (its workers serve), or FAILED; SHUTDOWN once stopped on purpose."""

    PENDING = "PENDING"
    LAUNCHING = "LAUNCHING"
    READY = "READY"
    FAILED = "FAILED"
    SHUTDOWN = "SHUTDOWN"

    @property
    def finished(self) -> bool:
        return self in (JobState.FAILED, JobState.SHUTDOWN)


class JobRecord(BaseModel):
    """One launch, as the controller keeps it (durable: no TTL, unlike worker records)."""

    job_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:+-]+$")
    launcher: Literal["local", "slurm", "ray", "skypilot"]
    model: str = Field(min_length=1)  # the catalog name; also the name it is served under
    state: JobState = JobState.PENDING
    reason: str | None = None  # why PENDING (Slurm's reason) or FAILED
    submitted_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    # The launch config as printed at launch (catalog entry with the overrides applied).
    config: dict[str, Any] = Field(default_factory=dict)
    worker_ids: list[str] = Field(default_factory=list)  # those this job starts
    worker_urls: list[str] = Field(default_factory=list)  # once they registered
    log_dir: str = ""  # LOG_DIR/FAMILY/NAME.JOB: sbatch script, launch.json, worker log
    batch: str | None = None  # the heterogeneous job this one is a component of
    cluster: str | None = None  # the SkyPilot cluster it runs on (`sky status CLUSTER`)
    shutdown_requested_at: float | None = None  # `vpool shutdown`: it ends SHUTDOWN, not FAILED
    # The controller that launched it (host:port): only it follows the job, since only it
    # has the job's local processes or its Slurm's commands.
    controller: str = ""
