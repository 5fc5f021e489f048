"""Which worker holds a stored response, so follow-up calls reach it.

vLLM keeps `/v1/responses` results in the memory of the engine that made them (with
`VLLM_ENABLE_RESPONSES_API_STORE=1`): `GET /v1/responses/{id}`, its `/cancel`, and a new
request naming it as `previous_response_id` only succeed on that worker. The gateway learns
the owner from the answer that carried the id (the JSON body, or a stream's
`response.created` event) and keeps the pairs in a bounded table, oldest dropped first.

A gateway that did not relay the answer (another replica behind the load balancer, or one
restarted since) asks the model's workers in turn with `GET /v1/responses/{id}` and
remembers the one that answers 200: no shared state, one lookup per id and gateway.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence

import orjson

from vpool.gateway.upstream import Origin, UpstreamPool, status_of
from vpool.registry.records import WorkerRecord

MAX_REMEMBERED = 100_000
LOOKUP_TIMEOUT_S = 5.0
_CREATED_EVENT = b"response.created"


class ResponseOwners:
    def __init__(self, pool: UpstreamPool, max_remembered: int = MAX_REMEMBERED) -> None:
        self._pool = pool
        self._max = max_remembered
        self._owners: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def remember(self, response_id: str, worker_id: str) -> None:
        owners = self._owners
        owners[response_id] = worker_id
        owners.move_to_end(response_id)
        if len(owners) > self._max:
            owners.popitem(last=False)

    def learn_from_body(self, body: bytes, worker_id: str) -> None:
        """A whole `/v1/responses` answer: remember its `id`."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(answer, dict) and isinstance(answer.get("id"), str):
            self.remember(answer["id"], worker_id)

    def learn_from_events(self, data: bytes, worker_id: str) -> None:
        """A stream's first events: remember the id in its `response.created` event."""
        if _CREATED_EVENT not in data:
            return
        for line in data.split(b"\n"):
            if not line.startswith(b"data:") or _CREATED_EVENT not in line:
                continue
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue
            response = event.get("response") if isinstance(event, dict) else None
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                self.remember(response["id"], worker_id)
                return

    def owner(self, response_id: str) -> str | None:
        return self._owners.get(response_id)

    async def locate(
        self, response_id: str, candidates: Sequence[WorkerRecord], origin_of: Callable[[str], Origin]
    ) -> WorkerRecord | None:
        """The candidate that holds `response_id`, asked all at once; None if none does."""
        known = self.owner(response_id)
        for worker in candidates:
            if worker.worker_id == known:
                return worker
        target = b"/v1/responses/" + response_id.encode()
        lookups = {
            asyncio.ensure_future(
                status_of(self._pool, origin_of(w.url), b"GET", target, LOOKUP_TIMEOUT_S)
            ): w
            for w in candidates
        }
        found: WorkerRecord | None = None
        pending = set(lookups)
        try:
            while pending and found is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.result() == 200:
                        found = lookups[task]
                        break
        finally:
            for task in pending:
                task.cancel()
        if found is not None:
            self.remember(response_id, found.worker_id)
        return found
