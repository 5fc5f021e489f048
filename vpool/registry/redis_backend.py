"""The Redis registry: worker records shared by several gateways and a controller.

This is the only module that knows the key layout. With `prefix` the configured
`registry.key_prefix`:

    {prefix}:workers         SET of worker ids: the index `list_workers` walks
    {prefix}:worker:{id}     HASH, PEXPIRE = the worker's TTL
        record               the WorkerRecord as JSON, minus the three fields below
        state                a WorkerState value, e.g. "READY"
        load                 the WorkerLoad as JSON
        last_heartbeat       Unix time in seconds, as a float

    {prefix}:announced-gateways       SET of gateway URLs: the index `list_gateways` walks
    {prefix}:announced-gateway:{url}  STRING, the GatewayRecord as JSON, PEXPIRE = the TTL the
                             gateway announces with (vpool/gateway/announce.py: three
                             announcement intervals); nothing routes on it, Prometheus
                             discovery reads it. (Not `{prefix}:gateways`: the limits' sorted
                             set of live gateways, vpool/gateway/limits.py, has that name.)

    {prefix}:jobs            HASH job id → the JobRecord as JSON (durable: no TTL; give
                             Redis persistence to keep jobs across its restarts)

Liveness is the hash's TTL: a worker that stops heartbeating loses its hash and nothing else
has to notice. Its id stays in the index until the next `list_workers` finds the hash gone
and removes it; a gateway's announcement expires and is pruned the same way. `put` writes
the whole hash in one MULTI/EXEC; `heartbeat` and `set_state` are Lua scripts that touch the
hash only if it still exists, so a late heartbeat cannot bring back a half-record of a worker
that has expired or been removed.

Every call is bounded by `timeout_s`, whole: socket connect and read timeouts, no retries, and
one deadline around the call (a Lua script may take two round trips, a frozen Redis accepts
connections and never answers them). A frozen Redis costs a caller one timeout, never a hang.
Every Redis failure surfaces as `RegistryUnavailable`. There is deliberately no retry: a
connection that a restarted Redis closed fails its next call, so every client notices the
restart (the gateway then keeps its workers while they register again, see
`vpool/gateway/fleet.py`) instead of finding the fleet silently empty. That failure also
drops the pool's other idle connections, closed just the same, so a restart costs a client
one failed call, not one per pooled connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.records import GatewayRecord, JobRecord, WorkerLoad, WorkerRecord, WorkerState
from vpool.registry.redis_client import bounded, redis_client

log = logging.getLogger(__name__)

# Fields that change after registration live in their own hash fields, not in `record`.
_VOLATILE = {"state", "load", "last_heartbeat"}

# KEYS[1] worker hash; ARGV: load JSON, last_heartbeat, ttl ms. 0 when the worker is unknown.
_HEARTBEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'load', ARGV[1], 'last_heartbeat', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1] worker hash; ARGV: state, ttl ms. 0 when the worker is unknown.
_SET_STATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1] index, KEYS[2..] worker hashes (or gateway keys); ARGV the matching ids (or URLs).
# Checking again here keeps a worker that re-registered (a gateway that announced again) since
# the listing read its key from being dropped from the index.
_PRUNE_LUA = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i - 1]) end
end
return 0
"""


class RedisRegistry:
    """`Registry` over `redis.asyncio`. It owns the client it is given and closes it."""

    def __init__(self, client: Redis, *, key_prefix: str = "vpool", timeout_s: float = 1.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._index = f"{key_prefix}:workers"
        self._jobs = f"{key_prefix}:jobs"
        self._gateways = f"{key_prefix}:announced-gateways"
        self._where = _describe(client)
        self._run_id = ""  # the Redis server's run_id at the last listing: it changes on a restart
        self._heartbeat = client.register_script(_HEARTBEAT_LUA)
        self._set_state = client.register_script(_SET_STATE_LUA)
        self._prune = client.register_script(_PRUNE_LUA)

    @classmethod
    def from_url(cls, url: str, *, key_prefix: str, timeout_s: float) -> RedisRegistry:
        """A registry with its own client; every Redis call is bounded by `timeout_s`."""
        return cls(redis_client(url, timeout_s), key_prefix=key_prefix, timeout_s=timeout_s)

    async def put(self, record: WorkerRecord, ttl_s: float) -> None:
        """Insert or replace a record, alive for `ttl_s` seconds."""
        key = self._key(record.worker_id)
        async with self._bounded("put"):
            async with self._client.pipeline(transaction=True) as pipe:
                # DEL first: a re-registration replaces the record, it does not merge into it.
                pipe.delete(key)
                pipe.hset(key, mapping=_encode(record))
                pipe.pexpire(key, _ttl_ms(ttl_s))
                pipe.sadd(self._index, record.worker_id)
                await pipe.execute()

    async def heartbeat(self, worker_id: str, load: WorkerLoad, ttl_s: float) -> WorkerRecord | None:
        """Refresh load, `last_heartbeat` and TTL; None when the worker is unknown."""
        args: list[EncodableT] = [load.model_dump_json(), repr(time.time()), _ttl_ms(ttl_s)]
        async with self._bounded("heartbeat"):
            reply = await self._heartbeat(keys=[self._key(worker_id)], args=args)
        return self._from_script(worker_id, reply)

    async def set_state(self, worker_id: str, state: WorkerState, ttl_s: float) -> WorkerRecord | None:
        """Change a worker's state and TTL; None when the worker is unknown."""
        args: list[EncodableT] = [state.value, _ttl_ms(ttl_s)]
        async with self._bounded("set_state"):
            reply = await self._set_state(keys=[self._key(worker_id)], args=args)
        return self._from_script(worker_id, reply)

    async def get(self, worker_id: str) -> WorkerRecord | None:
        async with self._bounded("get"):
            fields = await self._client.hgetall(self._key(worker_id))
        return _decode(worker_id, fields) if fields else None

    async def remove(self, worker_id: str) -> None:
        async with self._bounded("remove"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._key(worker_id))
                pipe.srem(self._index, worker_id)
                await pipe.execute()

    async def list_workers(self) -> list[WorkerRecord]:
        """Every live record, in no particular order; prunes ids whose hash expired.

        A Redis that restarted between two calls is reported unavailable once: redis-py
        reconnects silently, and the empty listing that follows would look like every
        worker gone. Said as an outage, it lets a gateway keep the workers it knew while
        they register again (see vpool/gateway/fleet.py)."""
        async with self._bounded("list_workers"):
            async with self._client.pipeline(transaction=False) as pipe:  # one round trip
                pipe.info("server")
                pipe.smembers(self._index)
                server, members = await pipe.execute()
            run_id = str(server.get("run_id", ""))
            restarted = bool(self._run_id) and run_id != self._run_id
            self._run_id = run_id
            if restarted:
                raise RegistryUnavailable(
                    f"redis registry at {self._where} restarted (a new run_id): its records may be lost"
                )
            ids = sorted(_text(i) for i in members)
            if not ids:
                return []
            async with self._client.pipeline(transaction=False) as pipe:
                for worker_id in ids:
                    pipe.hgetall(self._key(worker_id))
                replies = await pipe.execute()
            gone = [wid for wid, fields in zip(ids, replies, strict=True) if not fields]
            if gone:
                await self._prune(keys=[self._index, *map(self._key, gone)], args=gone)
        records = (_decode(wid, fields) for wid, fields in zip(ids, replies, strict=True) if fields)
        return [record for record in records if record is not None]

    async def announce_gateway(self, url: str, ttl_s: float) -> None:
        record = GatewayRecord(url=url)
        async with self._bounded("announce_gateway"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._gateway_key(url), record.model_dump_json(), px=_ttl_ms(ttl_s))
                pipe.sadd(self._gateways, url)
                await pipe.execute()

    async def withdraw_gateway(self, url: str) -> None:
        async with self._bounded("withdraw_gateway"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.delete(self._gateway_key(url))
                pipe.srem(self._gateways, url)
                await pipe.execute()

    async def list_gateways(self) -> list[GatewayRecord]:
        """Every live announcement, ordered by URL; prunes URLs whose key expired."""
        async with self._bounded("list_gateways"):
            urls = sorted(_text(u) for u in await self._client.smembers(self._gateways))
            if not urls:
                return []
            replies = await self._client.mget([self._gateway_key(url) for url in urls])
            gone = [url for url, raw in zip(urls, replies, strict=True) if raw is None]
            if gone:
                await self._prune(keys=[self._gateways, *map(self._gateway_key, gone)], args=gone)
        records = (_decode_gateway(url, raw) for url, raw in zip(urls, replies, strict=True) if raw)
        return [record for record in records if record is not None]

    async def put_job(self, job: JobRecord) -> None:
        async with self._bounded("put_job"):
            await self._client.hset(self._jobs, job.job_id, job.model_dump_json())

    async def get_job(self, job_id: str) -> JobRecord | None:
        async with self._bounded("get_job"):
            raw = await self._client.hget(self._jobs, job_id)
        return None if raw is None else _decode_job(job_id, raw)

    async def list_jobs(self) -> list[JobRecord]:
        async with self._bounded("list_jobs"):
            raw = await self._client.hgetall(self._jobs)
        jobs = [job for job_id, value in raw.items() if (job := _decode_job(_text(job_id), value))]
        return sorted(jobs, key=lambda j: (j.submitted_at, j.job_id))

    async def remove_job(self, job_id: str) -> None:
        async with self._bounded("remove_job"):
            await self._client.hdel(self._jobs, job_id)

    async def close(self) -> None:
        async with self._bounded("close"):
            await self._client.aclose()

    def _key(self, worker_id: str) -> str:
        return f"{self._prefix}:worker:{worker_id}"

    def _gateway_key(self, url: str) -> str:
        return f"{self._prefix}:announced-gateway:{url}"

    def _from_script(self, worker_id: str, reply: Any) -> WorkerRecord | None:
        """A script answers 0 for an unknown worker, else the hash as a flat HGETALL list."""
        if not isinstance(reply, list):
            return None
        fields = dict(zip(reply[::2], reply[1::2], strict=True))
        return _decode(worker_id, fields)

    def _bounded(self, operation: str) -> contextlib.AbstractAsyncContextManager[None]:
        return bounded(f"redis registry at {self._where}", operation, self._timeout_s, self._client)


def _encode(record: WorkerRecord) -> dict[FieldT, EncodableT]:
    return {
        "record": record.model_dump_json(exclude=_VOLATILE),
        "state": record.state.value,
        "load": record.load.model_dump_json(),
        "last_heartbeat": repr(record.last_heartbeat),
    }


def _decode(worker_id: str, raw: Mapping[Any, Any]) -> WorkerRecord | None:
    """Rebuild a record from its hash; None (and a warning) when another writer mangled it."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        data = json.loads(fields["record"])
        data["state"] = fields["state"]
        data["load"] = json.loads(fields["load"])
        data["last_heartbeat"] = float(fields["last_heartbeat"])
        return WorkerRecord.model_validate(data)
    except (KeyError, ValueError, TypeError, ValidationError) as exc:
        log.warning("ignoring malformed registry entry for worker %s: %s", worker_id, exc)
        return None


def _decode_job(job_id: str, raw: str | bytes) -> JobRecord | None:
    try:
        return JobRecord.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("ignoring malformed job record %s: %s", job_id, exc)
        return None


def _decode_gateway(url: str, raw: str | bytes) -> GatewayRecord | None:
    try:
        return GatewayRecord.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("ignoring malformed gateway announcement %s: %s", url, exc)
        return None


def _text(value: str | bytes) -> str:
    # A client handed to the constructor may not decode responses; from_url's does.
    return value.decode() if isinstance(value, bytes) else value


def _ttl_ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


def _describe(client: Redis) -> str:
    """Where the client points, for error messages; never the password."""
    kwargs: Mapping[str, Any] = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
