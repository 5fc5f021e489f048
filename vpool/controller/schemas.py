"""Bodies of the controller's HTTP API (pydantic: this is the admin path, not the hot one).

What workers send and get back (`Registration`, `RegistrationAccepted`) lives with the
records in `vpool/registry/records.py`: workers depend on the registry, never on the
controller.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from vpool.registry.records import WorkerRecord


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerRecord]


class ControllerHealth(BaseModel):
    """`GET /health`: always 200 while the controller runs; `degraded` while the registry is away."""

    status: Literal["ok", "degraded"]
    registry: Literal["ok", "unavailable"]
    registry_failures: int  # registry calls that failed since the controller started
    registry_error: str | None = None  # the latest failure, while it lasts
