"""A worker's side of the controller protocol: register, heartbeat, drain, deregister.

The worker keeps heartbeating whatever happens: when the controller answers 404 (it lost
the record: Redis restarted empty, or stayed frozen past the worker's TTL) the worker
registers again at once; when the controller is away, or answers 503 because its registry
is, it retries on the next beat. The fleet heals without anyone restarting a worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import httpx

from vpool.registry.records import Registration, RegistrationAccepted, WorkerLoad

log = logging.getLogger("vpool.worker")


class ControllerClient:
    def __init__(self, controller_url: str, token: str | None, timeout_s: float = 10.0) -> None:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.AsyncClient(
            base_url=controller_url.rstrip("/"), headers=headers, timeout=timeout_s
        )

    async def register(self, registration: Registration) -> RegistrationAccepted:
        resp = await self._http.post("/v1/workers", content=registration.model_dump_json())
        _raise_for_status(resp)
        return RegistrationAccepted.model_validate_json(resp.content)

    async def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """False when the controller no longer knows this worker."""
        resp = await self._http.post(f"/v1/workers/{worker_id}/heartbeat", content=load.model_dump_json())
        if resp.status_code == 404:
            return False
        _raise_for_status(resp)
        return True

    async def drain(self, worker_id: str) -> None:
        _raise_for_status(await self._http.post(f"/v1/workers/{worker_id}/drain"))

    async def deregister(self, worker_id: str) -> None:
        resp = await self._http.delete(f"/v1/workers/{worker_id}")
        if resp.status_code != 404:
            _raise_for_status(resp)

    async def aclose(self) -> None:
        await self._http.aclose()


class ControllerRefused(Exception):
    """The controller answered with an error; its OpenAI-style message is kept."""


def _raise_for_status(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        message = resp.json()["error"]["message"]
    except Exception:
        message = resp.text[:500]
    raise ControllerRefused(f"controller answered {resp.status_code}: {message}")


async def keep_registered(
    client: ControllerClient,
    registration: Registration,
    read_load: Callable[[], WorkerLoad],
    on_registered: Callable[[RegistrationAccepted], None] | None = None,
    *,
    retry_max_s: float = 5.0,
) -> None:
    """Register, then heartbeat forever; re-register whenever the controller forgets us.

    A failed heartbeat is retried at the heartbeat interval, never later: backing off would
    let the record expire. A failed registration is retried after an exponential backoff
    with jitter, capped at `retry_max_s`, so a fleet refused during an outage does not come
    back in lockstep. An outage logs one warning, and one line when it ends.
    """
    interval = 1.0
    registered = False
    failures = 0  # in a row, of the current kind of call
    while True:
        try:
            if not registered:
                accepted = await client.register(registration)
                interval = accepted.heartbeat_interval_s
                registered, failures = True, 0
                log.info("registered as %s", registration.worker_id)
                if on_registered is not None:
                    on_registered(accepted)
            elif await client.heartbeat(registration.worker_id, read_load()):
                if failures:
                    log.info("heartbeats accepted again after %d failed", failures)
                failures = 0
            else:
                log.warning("controller forgot this worker; registering again")
                registered, failures = False, 0
                continue
        except (httpx.HTTPError, ControllerRefused) as exc:
            failures += 1
            if failures == 1:
                action = "heartbeat" if registered else "registration"
                log.warning("%s failed (%s); retrying until the controller accepts it", action, exc)
            if not registered:
                await asyncio.sleep(_backoff(interval, failures, retry_max_s))
                continue
        await asyncio.sleep(interval)


def _backoff(interval_s: float, failures: int, max_s: float) -> float:
    """Doubling from one heartbeat interval up to `max_s`, then jittered down by up to half."""
    delay = min(max_s, interval_s * 2 ** min(failures - 1, 16))
    return delay * random.uniform(0.5, 1.0)
