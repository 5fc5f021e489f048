"""The two `KeyStore`s: Redis (a split fleet: every gateway and the controller share it) and
SQLite (`vpool up`: one file that outlives the process).

Redis layout, under the registry's prefix: `P:keys` (hash: key id -> the record as JSON),
`P:keys:used` (hash: key id -> when last used; written in batches, apart from the records so
that a use never overwrites an edit) and `P:keys:version` (a counter); usage beside them
(vpool/registry/usage.py). Keys and usage need a Redis that keeps its data: AOF or RDB
persistence (see the README).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from redis.asyncio import Redis

from vpool.config import GatewaySettings, KeyConfig, Settings
from vpool.registry.keys import ApiKey, KeyStore, with_secret
from vpool.registry.protocol import RegistryUnavailable
from vpool.registry.redis_client import bounded, redis_client
from vpool.registry.usage import (
    SQLITE_SCHEMA,
    UsageBatch,
    UsageQuery,
    UsageRow,
    from_redis_fields,
    redis_fields,
    rows,
    sqlite_add,
    sqlite_read,
)


class RedisKeyStore:
    def __init__(self, client: Redis, key_prefix: str, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._records = f"{key_prefix}:keys"
        self._used = f"{key_prefix}:keys:used"
        self._version = f"{key_prefix}:keys:version"
        self._usage = f"{key_prefix}:usage"

    async def put(self, key: ApiKey) -> None:
        async with self._bounded("put"):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(self._records, key.key_id, key.model_dump_json(exclude={"last_used_at"}))
            pipe.incr(self._version)
            await pipe.execute()

    async def get(self, key_id: str) -> ApiKey | None:
        async with self._bounded("get"):
            raw, used = await asyncio.gather(
                self._client.hget(self._records, key_id), self._client.hget(self._used, key_id)
            )
        return _decode(raw, used)

    async def list(self) -> list[ApiKey]:
        async with self._bounded("list"):
            raw, used = await asyncio.gather(
                self._client.hgetall(self._records), self._client.hgetall(self._used)
            )
        keys = [_decode(value, used.get(key_id)) for key_id, value in raw.items()]
        return sorted((k for k in keys if k is not None), key=lambda k: k.created_at)

    async def version(self) -> int:
        async with self._bounded("version"):
            return int(await self._client.get(self._version) or 0)

    async def touch(self, last_used: dict[str, float]) -> None:
        if last_used:
            async with self._bounded("touch"):
                await self._client.hset(self._used, mapping={k: repr(v) for k, v in last_used.items()})

    async def add_usage(self, batch: UsageBatch) -> None:
        async with self._bounded("add_usage"):
            pipe = self._client.pipeline(transaction=True)
            for hour, fields in redis_fields(batch).items():
                for name, value in fields.items():
                    pipe.hincrby(f"{self._usage}:{hour}", name, value)
                pipe.zadd(f"{self._usage}:hours", {str(hour): hour})
            await pipe.execute()

    async def usage(self, query: UsageQuery) -> builtins.list[UsageRow]:
        low, high = query.hours()
        async with self._bounded("usage"):
            hours = [int(str(h)) for h in await self._client.zrangebyscore(f"{self._usage}:hours", low, high)]
            pipe = self._client.pipeline(transaction=False)
            for hour in hours:
                pipe.hgetall(f"{self._usage}:{hour}")
            replies = await pipe.execute() if hours else []
        found = {}
        for hour, fields in zip(hours, replies, strict=True):
            found.update(from_redis_fields(hour, fields))
        return rows(found, query)

    async def close(self) -> None:
        await self._client.aclose()

    def _bounded(self, operation: str) -> contextlib.AbstractAsyncContextManager[None]:
        return bounded("the key store (Redis)", operation, self._timeout_s)


def _decode(raw: str | bytes | None, used: str | bytes | None) -> ApiKey | None:
    if raw is None:
        return None
    key = ApiKey.model_validate_json(raw)
    if used is not None:
        key.last_used_at = float(used)
    return key


@contextlib.contextmanager
def _sqlite_errors(operation: str) -> Iterator[None]:
    """A locked or broken file is a store that cannot answer, as a Redis away would be."""
    try:
        yield
    except sqlite3.Error as exc:
        raise RegistryUnavailable(f"the key store (SQLite) failed during {operation}: {exc}") from exc


class SqliteKeyStore:
    """Keys in one SQLite file. Each call is a local read or a small transaction (tens of
    microseconds), made on the event loop's thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Another process (a second `vpool up`) writing: wait for it a little, then fail.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, record TEXT NOT NULL,"
            " last_used_at REAL);"
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
            "INSERT OR IGNORE INTO meta VALUES ('version', 0);" + SQLITE_SCHEMA
        )

    async def put(self, key: ApiKey) -> None:
        record = key.model_dump_json(exclude={"last_used_at"})
        with _sqlite_errors("put"), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO keys (key_id, record) VALUES (?, ?)"
                " ON CONFLICT(key_id) DO UPDATE SET record = excluded.record",
                (key.key_id, record),
            )
            self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'version'")

    async def get(self, key_id: str) -> ApiKey | None:
        with _sqlite_errors("get"):
            row = self._db.execute(
                "SELECT record, last_used_at FROM keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else _decode(row[0], None if row[1] is None else repr(row[1]))

    async def list(self) -> list[ApiKey]:
        with _sqlite_errors("list"):
            rows = self._db.execute("SELECT record, last_used_at FROM keys").fetchall()
        keys = [_decode(r[0], None if r[1] is None else repr(r[1])) for r in rows]
        return sorted((k for k in keys if k is not None), key=lambda k: k.created_at)

    async def version(self) -> int:
        with _sqlite_errors("version"):
            return int(self._db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0])

    async def touch(self, last_used: dict[str, float]) -> None:
        if last_used:
            with _sqlite_errors("touch"), self._db:
                self._db.executemany(
                    "UPDATE keys SET last_used_at = ? WHERE key_id = ?",
                    [(t, k) for k, t in last_used.items()],
                )

    async def add_usage(self, batch: UsageBatch) -> None:
        with _sqlite_errors("add_usage"), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            sqlite_add(self._db, batch)

    async def usage(self, query: UsageQuery) -> builtins.list[UsageRow]:
        with _sqlite_errors("usage"):
            return rows(sqlite_read(self._db, query), query)

    async def close(self) -> None:
        self._db.close()


def open_key_store(settings: Settings) -> KeyStore:
    """Redis when the registry is Redis (shared by every gateway), else the SQLite file."""
    registry = settings.registry
    if registry.url.startswith("memory://"):
        return SqliteKeyStore(registry.keys_file or settings.cache_dir / "keys.sqlite3")
    client = redis_client(registry.url, registry.timeout_s)
    return RedisKeyStore(client, registry.key_prefix, registry.timeout_s)


def config_keys(settings: GatewaySettings) -> list[ApiKey]:
    """The config file's keys as records (ids `config-N`: never in the store)."""
    plain = [KeyConfig(key=secret) for secret in settings.api_keys]
    keys = []
    for i, entry in enumerate([*plain, *settings.keys]):
        record = ApiKey(
            key_id=f"config-{i}",
            name=entry.name or f"config-{i}",
            models=entry.models,
            rpm=entry.rpm,
            tpm=entry.tpm,
            max_parallel=entry.max_parallel,
            priority=entry.priority,
        )
        keys.append(with_secret(record, entry.key))
    return keys
