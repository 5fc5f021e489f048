"""Following a launched job through its states, for the launcher tests (Slurm, Ray)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from vpool.client import VpoolClient
from vpool.registry.records import JobState


def follow_job(
    client: Callable[[], AbstractContextManager[VpoolClient]],
    job_id: str,
    until: set[JobState],
    timeout_s: float,
    explain: Callable[[], str] = lambda: "",
) -> list[JobState]:
    """The states a job goes through (each once, in order) until one in `until`.

    Fails with the states seen, the job's last record and `explain()` (the cluster's view,
    the logs) when none of `until` comes within `timeout_s`.
    """
    seen: list[JobState] = []
    job = None
    deadline = time.monotonic() + timeout_s
    with client() as jobs:
        while time.monotonic() < deadline:
            job = jobs.status(job_id)
            if not seen or seen[-1] != job.state:
                seen.append(job.state)
            if job.state in until:
                return seen
            time.sleep(0.5)
    raise AssertionError(f"job {job_id} went {seen} and never reached {until}: {job}\n{explain()}")
