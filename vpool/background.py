"""Stopping background loops for sure.

A cancelled task can go on running: redis-py 8.1 on Python 3.11 sometimes swallows the
cancellation of a task that is inside a Redis call (the call returns normally), so a loop
that polls Redis, cancelled once and awaited, may never end. A gateway then hung on
SIGTERM. `cancel_and_wait` cancels again until the task has ended, within a bound.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("vpool")


async def cancel_and_wait(task: asyncio.Task[None], timeout_s: float = 5.0, retry_s: float = 0.05) -> bool:
    """Cancel `task` (again, if need be) until it ends; False if it outlived `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=retry_s)
    if not task.done():
        log.warning("background task %s did not stop within %.0f s", task.get_name(), timeout_s)
        return False
    if not task.cancelled() and task.exception() is not None:
        log.warning("background task %s had failed: %r", task.get_name(), task.exception())
    return True
