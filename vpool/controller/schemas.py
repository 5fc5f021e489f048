"""Bodies of the controller's HTTP API (pydantic: this is the admin path, not the hot one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from vpool.controller.records import WorkerInfo, WorkerRecord


class Registration(WorkerInfo):
    """What a worker (or an admin adding an external server) tells the controller."""


class RegistrationAccepted(BaseModel):
    worker_id: str
    heartbeat_interval_s: float
    ttl_s: float


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerRecord]


class ControllerHealth(BaseModel):
    """`GET /health`: always 200 while the controller runs; `degraded` while the registry is away."""

    status: Literal["ok", "degraded"]
    registry: Literal["ok", "unavailable"]
    registry_failures: int  # registry calls that failed since the controller started
    registry_error: str | None = None  # the latest failure, while it lasts
