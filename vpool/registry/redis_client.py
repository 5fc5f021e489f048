"""The one way vpool makes a Redis client: every call bounded, none retried.

redis-py retries a failed call three times by default; a gateway must rather fail fast and
serve from what it last read (see vpool/registry/redis_backend.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from vpool.registry.protocol import RegistryUnavailable


def redis_client(url: str, timeout_s: float) -> Redis:
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


@contextlib.asynccontextmanager
async def bounded(
    what: str, operation: str, timeout_s: float, client: Redis | None = None
) -> AsyncIterator[None]:
    """At most `timeout_s` for the calls inside, whole; whatever Redis or the network raised
    becomes RegistryUnavailable, "{what} failed during {operation}: why". redis-py drops a
    connection whose command was cancelled, so the deadline leaves no half-read reply in the
    pool. With `client`, a connection error also drops the pool's idle connections: a
    restarted Redis closed them all, and this way it costs one failed call, not one each."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except (TimeoutError, RedisError, OSError) as exc:
        if client is not None and isinstance(exc, RedisConnectionError):
            with contextlib.suppress(RedisError, OSError):
                await client.connection_pool.disconnect(inuse_connections=False)
        why = f"{type(exc).__name__}: {exc}" if str(exc) else f"no answer within {timeout_s} s"
        raise RegistryUnavailable(f"{what} failed during {operation}: {why}") from exc
