"""Usage you can bill from: counts per key, model and hour, and how each store keeps them.

Gateways add what they served in batches (one write a second, not one per request); the
admin API reads it back by hour or day. Both key stores keep usage beside the keys, so it
survives restarts the same way: Redis under `P:usage:HOUR` (a hash per hour: field
`KEY_ID<US>MODEL<US>KIND` -> count) with `P:usage:hours` (a sorted set of the hours that
have any), SQLite in a `usage` table.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

HOUR_S = 3600
DAY_S = 24 * HOUR_S
KINDS = ("requests", "prompt_tokens", "completion_tokens", "errors")
_SEPARATOR = "\x1f"  # the unit separator: in no key id, nor in a model name a worker serves

UsageKey = tuple[int, str, str]  # (hour start, key id, model)
Granularity = Literal["hour", "day"]


def hour_of(timestamp: float) -> int:
    """The start of the hour `timestamp` falls in (UTC, seconds since the epoch)."""
    return int(timestamp // HOUR_S) * HOUR_S


@dataclass(slots=True)
class Counts:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.errors += other.errors

    def items(self) -> list[tuple[str, int]]:
        return [(kind, getattr(self, kind)) for kind in KINDS if getattr(self, kind)]


class UsageRow(BaseModel):
    """One key's use of one model in one hour (or day)."""

    start: int
    key_id: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class UsageQuery:
    since: float | None = None
    until: float | None = None  # exclusive
    key_id: str | None = None
    model: str | None = None
    by: Granularity = "hour"

    def hours(self) -> tuple[float, float]:
        """The range of hour starts to read: every hour that overlaps [since, until)."""
        low = hour_of(self.since) if self.since is not None else float("-inf")
        return low, (self.until if self.until is not None else float("inf"))

    def wants(self, key_id: str, model: str) -> bool:
        return (self.key_id is None or key_id == self.key_id) and (self.model is None or model == self.model)


@dataclass(slots=True)
class UsageBatch:
    """What a gateway served since its last write, added up."""

    counts: dict[UsageKey, Counts] = field(default_factory=dict)

    def add(self, key: UsageKey, counts: Counts) -> None:
        mine = self.counts.get(key)
        if mine is None:
            self.counts[key] = mine = Counts()
        mine.add(counts)

    def merge(self, other: UsageBatch) -> None:
        for key, counts in other.counts.items():
            self.add(key, counts)

    def __bool__(self) -> bool:
        return bool(self.counts)


def rows(found: Mapping[UsageKey, Counts], query: UsageQuery) -> list[UsageRow]:
    """The counts that `query` asks for, by hour or by day, in time order."""
    grouped: dict[UsageKey, Counts] = {}
    step = DAY_S if query.by == "day" else HOUR_S
    for (hour, key_id, model), counts in found.items():
        if not query.wants(key_id, model):
            continue
        if query.since is not None and hour + HOUR_S <= query.since:
            continue
        if query.until is not None and hour >= query.until:
            continue
        group = (hour // step * step, key_id, model)
        grouped.setdefault(group, Counts()).add(counts)
    return [
        UsageRow(start=start, key_id=key_id, model=model, **_as_dict(counts))
        for (start, key_id, model), counts in sorted(grouped.items())
    ]


def _as_dict(counts: Counts) -> dict[str, int]:
    return {kind: getattr(counts, kind) for kind in KINDS}


# Redis


def redis_fields(batch: UsageBatch) -> dict[int, dict[str, int]]:
    """HINCRBY arguments per hour: field `KEY_ID<US>MODEL<US>KIND` -> increment."""
    by_hour: dict[int, dict[str, int]] = {}
    for (hour, key_id, model), counts in batch.counts.items():
        fields = by_hour.setdefault(hour, {})
        for kind, value in counts.items():
            fields[_SEPARATOR.join((key_id, model, kind))] = value
    return by_hour


def from_redis_fields(hour: int, fields: Mapping[str, str]) -> dict[UsageKey, Counts]:
    found: dict[UsageKey, Counts] = {}
    for name, value in fields.items():
        key_id, model, kind = name.split(_SEPARATOR)
        counts = found.setdefault((hour, key_id, model), Counts())
        if kind in KINDS:
            setattr(counts, kind, getattr(counts, kind) + int(value))
    return found


# SQLite

SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (hour INTEGER NOT NULL, key_id TEXT NOT NULL,"
    " model TEXT NOT NULL, requests INTEGER NOT NULL DEFAULT 0,"
    " prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,"
    " errors INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (hour, key_id, model));"
)


def sqlite_add(db: sqlite3.Connection, batch: UsageBatch) -> None:
    db.executemany(
        "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(hour, key_id, model) DO UPDATE SET"
        " requests = requests + excluded.requests,"
        " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
        " completion_tokens = completion_tokens + excluded.completion_tokens,"
        " errors = errors + excluded.errors",
        [(*key, *(_as_dict(c).values())) for key, c in batch.counts.items()],
    )


def sqlite_read(db: sqlite3.Connection, query: UsageQuery) -> dict[UsageKey, Counts]:
    low, high = query.hours()
    found: Iterable[tuple[int, str, str, int, int, int, int]] = db.execute(
        "SELECT hour, key_id, model, requests, prompt_tokens, completion_tokens, errors FROM usage"
        " WHERE hour >= ? AND hour < ?",
        (low if low != float("-inf") else -(2**62), high if high != float("inf") else 2**62),
    ).fetchall()
    return {(h, k, m): Counts(r, p, c, e) for h, k, m, r, p, c, e in found}
