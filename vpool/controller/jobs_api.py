"""The controller's admin API for jobs (what `vpool launch/status/jobs/...` talk to).

    POST   /admin/v1/jobs              launch a catalog model (one job per replica)
    POST   /admin/v1/jobs/batch        several models as one Slurm heterogeneous job
    GET    /admin/v1/jobs              every job, its state read again
    GET    /admin/v1/jobs/{id}         one job
    DELETE /admin/v1/jobs/{id}         shut it down: the worker drains, then leaves
    GET    /admin/v1/jobs/{id}/log     the worker's log, from ?offset= (negative: from the end)
    GET    /admin/v1/jobs/{id}/metrics the worker's vLLM metrics, read now

Guarded by the admin token (`controller.admin_token`, `VPOOL_ADMIN_TOKEN`), never by a
client key or the registration token; with none set, only loopback clients are answered.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from vpool.config import ControllerSettings
from vpool.controller.admin_auth import admin_guard
from vpool.controller.jobs import JobManager
from vpool.controller.worker_metrics import WorkerMetrics
from vpool.launch import BatchLaunchRequest, LaunchRequest
from vpool.registry.records import JobRecord


class JobList(BaseModel):
    object: str = "list"
    data: list[JobRecord]


class JobLog(BaseModel):
    text: str
    next_offset: int


class JobMetrics(BaseModel):
    job_id: str
    workers: list[WorkerMetrics]


def jobs_router(settings: ControllerSettings) -> APIRouter:
    require_admin = admin_guard(settings)
    router = APIRouter(prefix="/admin/v1/jobs", dependencies=[Depends(require_admin)], tags=["jobs"])

    def manager(request: Request) -> JobManager:
        jobs: JobManager = request.app.state.jobs
        return jobs

    @router.post("", status_code=201)
    async def launch(body: LaunchRequest, request: Request) -> JobList:
        return JobList(data=await manager(request).launch(body))

    @router.post("/batch", status_code=201)
    async def batch_launch(body: BatchLaunchRequest, request: Request) -> JobList:
        return JobList(data=await manager(request).batch_launch(body))

    @router.get("")
    async def list_jobs(request: Request) -> JobList:
        return JobList(data=await manager(request).list_all())

    @router.get("/{job_id}")
    async def get_job(job_id: str, request: Request) -> JobRecord:
        return await manager(request).get(job_id)

    @router.delete("/{job_id}")
    async def shutdown(job_id: str, request: Request) -> JobRecord:
        return await manager(request).shutdown(job_id)

    @router.get("/{job_id}/log")
    async def read_log(job_id: str, request: Request, offset: int = 0) -> JobLog:
        text, next_offset = await manager(request).read_log(job_id, offset)
        return JobLog(text=text, next_offset=next_offset)

    @router.get("/{job_id}/metrics")
    async def metrics(job_id: str, request: Request) -> JobMetrics:
        return JobMetrics(job_id=job_id, workers=await manager(request).metrics(job_id))

    return router
