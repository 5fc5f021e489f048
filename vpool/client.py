"""The typed Python API for running a fleet; the `vpool` CLI is built on it.

    from vpool.client import VpoolClient

    with VpoolClient("http://10.0.0.2:8001", admin_token="...") as fleet:
        (job,) = fleet.launch("Meta-Llama-3.1-8B-Instruct", launcher="slurm", gpu="A100-80GB")
        job = fleet.wait_until_ready(job.job_id)
        print(job.worker_urls, fleet.metrics(job.job_id))
        fleet.shutdown(job.job_id)

`AsyncVpoolClient` has the same verbs as coroutines. `list` and `plan` read the catalog
here, with no controller; every other verb asks the controller, and its errors arrive as
`VpoolClientError` with the controller's OpenAI-shaped message.

API keys, through the controller's admin API (the admin token):

    made = fleet.create_key("team-a", models=["llama-3-8b"], rpm=600)
    print(made["secret"])  # shown once: the controller keeps only its SHA-256 digest
    fleet.update_key(made["key"]["key_id"], models=None)  # None: every model
    fleet.revoke_key(made["key"]["key_id"])
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from pathlib import Path
from typing import Any

import httpx

from vpool.launch import BatchLaunchRequest, LaunchOverrides, LaunchRequest
from vpool.registry.records import JobRecord, JobState

DEFAULT_CONTROLLER = "http://127.0.0.1:8001"
KEYS_PATH = "/admin/v1/keys"
USAGE_PATH = "/admin/v1/usage"


class _Unset(enum.Enum):
    UNSET = "UNSET"


UNSET = _Unset.UNSET  # `update_key`'s "leave this field as it is" (None clears where it can)


class VpoolClientError(Exception):
    """The controller refused, or could not be reached; `message` says why."""

    def __init__(self, message: str, status: int = 0, code: str | int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "status": self.status, "code": self.code}}


def launch_request(
    model: str, launcher: str = "local", force: bool = False, **overrides: Any
) -> LaunchRequest:
    """A launch of `model` with catalog overrides given by name (`max_model_len=4096`, ...)."""
    return LaunchRequest.model_validate(
        {"model": model, "launcher": launcher, "force": force, "overrides": LaunchOverrides(**overrides)}
    )


def _base(controller_url: str | None) -> str:
    return (controller_url or os.environ.get("VPOOL_CONTROLLER_URL") or DEFAULT_CONTROLLER).rstrip("/")


def _headers(admin_token: str | None) -> dict[str, str]:
    token = admin_token if admin_token is not None else os.environ.get("VPOOL_ADMIN_TOKEN")
    return {"authorization": f"Bearer {token}"} if token else {}


def _answer(resp: httpx.Response) -> Any:
    if resp.is_success:
        return resp.json()
    try:
        error = resp.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = resp.text[:500] or f"HTTP {resp.status_code}", None
    raise VpoolClientError(message, resp.status_code, code)


def _unreachable(url: str, exc: Exception) -> VpoolClientError:
    return VpoolClientError(
        f"The controller at {url} could not be reached ({type(exc).__name__}). Is `vpool controller` "
        "running? Point at it with --controller or VPOOL_CONTROLLER_URL.",
        code="controller_unreachable",
    )


class VpoolClient:
    def __init__(
        self, controller_url: str | None = None, admin_token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.controller_url = _base(controller_url)
        self._http = httpx.Client(
            base_url=self.controller_url, headers=_headers(admin_token), timeout=timeout_s
        )

    def __enter__(self) -> VpoolClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _answer(self._http.request(method, path, **kwargs))
        except httpx.HTTPError as exc:
            raise _unreachable(self.controller_url, exc) from None

    # the catalog, read here

    def list_models(self, catalog: list[Path] | None = None) -> list[Any]:
        from vpool.catalog.catalog import load_catalog

        return list(load_catalog(catalog or []))

    def plan(self, model: str, catalog: list[Path] | None = None, **options: Any) -> Any:
        from vpool.catalog.catalog import load_catalog
        from vpool.catalog.planner import plan

        target: Any = model if Path(model).is_dir() else load_catalog(catalog or []).get(model)
        return plan(target, **options)

    # jobs, through the controller

    def launch(
        self, model: str, launcher: str = "local", force: bool = False, **overrides: Any
    ) -> list[JobRecord]:
        return self.submit(launch_request(model, launcher, force, **overrides))

    def submit(self, request: LaunchRequest) -> list[JobRecord]:
        """Launch what `request` says (`launch_request` builds one): one job per replica."""
        return _jobs(self._call("POST", "/admin/v1/jobs", json=request.model_dump(mode="json")))

    def batch_launch(self, requests: list[LaunchRequest]) -> list[JobRecord]:
        body = BatchLaunchRequest(models=requests).model_dump(mode="json")
        return _jobs(self._call("POST", "/admin/v1/jobs/batch", json=body))

    def status(self, job_id: str) -> JobRecord:
        return JobRecord.model_validate(self._call("GET", f"/admin/v1/jobs/{job_id}"))

    def jobs(self) -> list[JobRecord]:
        return _jobs(self._call("GET", "/admin/v1/jobs"))

    def wait_until_ready(self, job_id: str, timeout_s: float = 1800.0, poll_s: float = 2.0) -> JobRecord:
        """The job once READY; VpoolClientError if it fails, ends or outlasts `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.status(job_id)
            _check_waiting(job)
            if job.state == JobState.READY:
                return job
            if time.monotonic() > deadline:
                raise VpoolClientError(f"Job {job_id} is still {job.state.value} after {timeout_s:g} s.")
            time.sleep(poll_s)

    def metrics(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/jobs/{job_id}/metrics")
        return result

    def log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        got = self._call("GET", f"/admin/v1/jobs/{job_id}/log", params={"offset": offset})
        return got["text"], got["next_offset"]

    def shutdown(self, job_id: str) -> JobRecord:
        return JobRecord.model_validate(self._call("DELETE", f"/admin/v1/jobs/{job_id}"))

    # API keys, through the controller

    def create_key(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        priority: int | None = None,
        expires_at: float | None = None,
        meta: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Make a key; the answer is `{"key": {...}, "secret": "vp-..."}`, the one time the
        secret is shown. `models` None: every model; `expires_at` in seconds since the epoch."""
        body = _key_body(name, models, rpm, tpm, max_parallel, priority, expires_at, meta)
        result: dict[str, Any] = self._call("POST", KEYS_PATH, json=body)
        return result

    def keys(self) -> list[dict[str, Any]]:
        """Every key, revoked ones included (never a secret)."""
        result: list[dict[str, Any]] = self._call("GET", KEYS_PATH)["data"]
        return result

    def key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"{KEYS_PATH}/{key_id}")
        return result

    def update_key(
        self,
        key_id: str,
        *,
        name: str | _Unset = UNSET,
        models: list[str] | _Unset | None = UNSET,
        rpm: int | _Unset | None = UNSET,
        tpm: int | _Unset | None = UNSET,
        max_parallel: int | _Unset | None = UNSET,
        priority: int | _Unset = UNSET,
        expires_at: float | _Unset | None = UNSET,
        meta: dict[str, str] | _Unset = UNSET,
    ) -> dict[str, Any]:
        """Change the fields given, and only those; None clears one (`models=None`: every
        model, `rpm=None`: no limit, `expires_at=None`: never). The key as it is now."""
        changes = _key_changes(
            name=name, models=models, rpm=rpm, tpm=tpm, max_parallel=max_parallel,
            priority=priority, expires_at=expires_at, meta=meta,
        )  # fmt: skip
        result: dict[str, Any] = self._call("PATCH", f"{KEYS_PATH}/{key_id}", json=changes)
        return result

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        """Revoke a key for good (every gateway refuses it within about a second)."""
        result: dict[str, Any] = self._call("DELETE", f"{KEYS_PATH}/{key_id}")
        return result

    def usage(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        by: str = "hour",
    ) -> list[dict[str, Any]]:
        """What each key used of each model, per hour or day (UTC): requests, prompt and
        completion tokens, errors. `since`/`until` in seconds since the epoch."""
        params = _usage_params(key_id, model, since, until, by)
        result: list[dict[str, Any]] = self._call("GET", USAGE_PATH, params=params)["data"]
        return result


class AsyncVpoolClient:
    """`VpoolClient`'s verbs as coroutines (the catalog ones stay plain functions there)."""

    def __init__(
        self, controller_url: str | None = None, admin_token: str | None = None, timeout_s: float = 60.0
    ) -> None:
        self.controller_url = _base(controller_url)
        self._http = httpx.AsyncClient(
            base_url=self.controller_url, headers=_headers(admin_token), timeout=timeout_s
        )

    async def __aenter__(self) -> AsyncVpoolClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return _answer(await self._http.request(method, path, **kwargs))
        except httpx.HTTPError as exc:
            raise _unreachable(self.controller_url, exc) from None

    async def launch(
        self, model: str, launcher: str = "local", force: bool = False, **overrides: Any
    ) -> list[JobRecord]:
        return await self.submit(launch_request(model, launcher, force, **overrides))

    async def submit(self, request: LaunchRequest) -> list[JobRecord]:
        return _jobs(await self._call("POST", "/admin/v1/jobs", json=request.model_dump(mode="json")))

    async def batch_launch(self, requests: list[LaunchRequest]) -> list[JobRecord]:
        body = BatchLaunchRequest(models=requests).model_dump(mode="json")
        return _jobs(await self._call("POST", "/admin/v1/jobs/batch", json=body))

    async def status(self, job_id: str) -> JobRecord:
        return JobRecord.model_validate(await self._call("GET", f"/admin/v1/jobs/{job_id}"))

    async def jobs(self) -> list[JobRecord]:
        return _jobs(await self._call("GET", "/admin/v1/jobs"))

    async def wait_until_ready(
        self, job_id: str, timeout_s: float = 1800.0, poll_s: float = 2.0
    ) -> JobRecord:
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.status(job_id)
            _check_waiting(job)
            if job.state == JobState.READY:
                return job
            if time.monotonic() > deadline:
                raise VpoolClientError(f"Job {job_id} is still {job.state.value} after {timeout_s:g} s.")
            await asyncio.sleep(poll_s)

    async def metrics(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"/admin/v1/jobs/{job_id}/metrics")
        return result

    async def log(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        got = await self._call("GET", f"/admin/v1/jobs/{job_id}/log", params={"offset": offset})
        return got["text"], got["next_offset"]

    async def shutdown(self, job_id: str) -> JobRecord:
        return JobRecord.model_validate(await self._call("DELETE", f"/admin/v1/jobs/{job_id}"))

    async def create_key(
        self,
        name: str,
        *,
        models: list[str] | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        priority: int | None = None,
        expires_at: float | None = None,
        meta: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """See `VpoolClient.create_key`: `{"key": {...}, "secret": "vp-..."}`, shown once."""
        body = _key_body(name, models, rpm, tpm, max_parallel, priority, expires_at, meta)
        result: dict[str, Any] = await self._call("POST", KEYS_PATH, json=body)
        return result

    async def keys(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = (await self._call("GET", KEYS_PATH))["data"]
        return result

    async def key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", f"{KEYS_PATH}/{key_id}")
        return result

    async def update_key(
        self,
        key_id: str,
        *,
        name: str | _Unset = UNSET,
        models: list[str] | _Unset | None = UNSET,
        rpm: int | _Unset | None = UNSET,
        tpm: int | _Unset | None = UNSET,
        max_parallel: int | _Unset | None = UNSET,
        priority: int | _Unset = UNSET,
        expires_at: float | _Unset | None = UNSET,
        meta: dict[str, str] | _Unset = UNSET,
    ) -> dict[str, Any]:
        """See `VpoolClient.update_key`: only the fields given are sent; None clears one."""
        changes = _key_changes(
            name=name, models=models, rpm=rpm, tpm=tpm, max_parallel=max_parallel,
            priority=priority, expires_at=expires_at, meta=meta,
        )  # fmt: skip
        result: dict[str, Any] = await self._call("PATCH", f"{KEYS_PATH}/{key_id}", json=changes)
        return result

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("DELETE", f"{KEYS_PATH}/{key_id}")
        return result

    async def usage(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
        by: str = "hour",
    ) -> list[dict[str, Any]]:
        params = _usage_params(key_id, model, since, until, by)
        result: list[dict[str, Any]] = (await self._call("GET", USAGE_PATH, params=params))["data"]
        return result


def _key_body(
    name: str,
    models: list[str] | None,
    rpm: int | None,
    tpm: int | None,
    max_parallel: int | None,
    priority: int | None,
    expires_at: float | None,
    meta: dict[str, str] | None,
) -> dict[str, Any]:
    """A new key's fields; those left None are not sent (the controller's defaults)."""
    body: dict[str, Any] = {
        "name": name, "models": models, "rpm": rpm, "tpm": tpm, "max_parallel": max_parallel,
        "priority": priority, "expires_at": expires_at, "meta": meta,
    }  # fmt: skip
    return {k: v for k, v in body.items() if v is not None}


def _usage_params(
    key_id: str | None, model: str | None, since: float | None, until: float | None, by: str
) -> dict[str, Any]:
    params = {"key_id": key_id, "model": model, "since": since, "until": until, "by": by}
    return {k: v for k, v in params.items() if v is not None}


def _key_changes(**fields: Any) -> dict[str, Any]:
    """The fields given (null where one is cleared); UNSET ones are not sent."""
    return {k: v for k, v in fields.items() if v is not UNSET}


def _jobs(answer: Any) -> list[JobRecord]:
    return [JobRecord.model_validate(j) for j in answer["data"]]


def _check_waiting(job: JobRecord) -> None:
    if job.state.finished:
        raise VpoolClientError(
            f"Job {job.job_id} ended {job.state.value}: {job.reason or 'no reason given'}.",
            code=job.state.value.lower(),
        )
