"""The usage ledger: who used how much of what, hour by hour, in the coordinator's store.

Rows are aggregates, not one per request: (hour, subject, model, route, outcome) with
the sums of requests, prompt, completion, cached and trained tokens and device-seconds.
A gateway adds up its requests in memory and reports every couple of seconds
(``gateway/usage.py``), the training manager adds a job when it ends, so a write never
sits on a request's path and the ledger grows with callers x models x hours, not with
traffic.  Reading a month for a tenant reads its ~720 hours of rows at most.

Kept ``coordinator.usage_retention_days`` (400 by default: a year of months to compare):
SQLite deletes older hours as it writes (at most once a minute); Redis gives each hour's
hash an expiry.  The per-request detail (request id, latency, status) is the access
log's; the ledger is what billing and budgets read.
"""

from __future__ import annotations

import abc
import datetime as dt
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from cyllm.coordinator.sqlite import Database, transaction
from cyllm.protocol import pb

HOUR = 3600
KEY_FIELDS = ("subject", "model", "route", "outcome")
SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "trained_tokens", "device_seconds")
GROUPS = ("hour", "day", "month", *KEY_FIELDS)
MAX_GROUPS = 10_000  # one answer's rows; past it the report says truncated


def hour_of(t: float) -> int:
    return int(t) // HOUR * HOUR


def period_start(start: int, by: str) -> int:
    """The start of the UTC hour, day or month ``start`` falls in."""
    if by == "hour":
        return hour_of(start)
    if by == "day":
        return int(start) // 86400 * 86400
    day = dt.datetime.fromtimestamp(start, dt.UTC)
    return int(dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC).timestamp())


def period_bounds(period: str, now: float) -> tuple[int, int]:
    """The UTC day's or month's start and end around ``now`` (a budget's periods)."""
    start = period_start(int(now), period)
    if period == "day":
        return start, start + 86400
    return start, period_start(start + 32 * 86400, "month")


@dataclass
class Grouping:
    """What one query's rows are added up by: at most one period, and any key fields."""

    period: str | None
    keys: tuple[str, ...]

    @classmethod
    def of(cls, group_by: Iterable[str]) -> Grouping:
        group_by = list(dict.fromkeys(group_by))
        unknown = [g for g in group_by if g not in GROUPS]
        if unknown:
            raise ValueError(f"cannot group by {unknown[0]!r}: one of {', '.join(GROUPS)}")
        periods = [g for g in group_by if g in ("hour", "day", "month")]
        if len(periods) > 1:
            raise ValueError(f"group by one period at most, not {' and '.join(periods)}")
        return cls(periods[0] if periods else None, tuple(g for g in KEY_FIELDS if g in group_by))


class Sums:
    """Rows added up by a grouping, bounded by ``MAX_GROUPS``."""

    def __init__(self, grouping: Grouping) -> None:
        self.grouping = grouping
        self.rows: dict[tuple, pb.UsageRow] = {}
        self.truncated = False
        self.total = pb.UsageRow()

    def add(self, row: pb.UsageRow) -> None:
        add_sums(self.total, row)
        g = self.grouping
        start = period_start(row.start, g.period) if g.period else 0
        key = (start, *(getattr(row, k) for k in g.keys))
        found = self.rows.get(key)
        if found is None:
            if len(self.rows) >= MAX_GROUPS:
                self.truncated = True
                return
            found = self.rows[key] = pb.UsageRow(start=start, **dict(zip(g.keys, key[1:])))
        add_sums(found, row)

    def report(self) -> pb.UsageReport:
        rows = sorted(self.rows.values(), key=lambda r: (r.start, *(getattr(r, k) for k in KEY_FIELDS)))
        return pb.UsageReport(rows=rows, truncated=self.truncated, total=self.total)


def add_sums(into: pb.UsageRow, row: pb.UsageRow) -> None:
    for name in SUMS:
        setattr(into, name, getattr(into, name) + getattr(row, name))


class Ledger(abc.ABC):
    def __init__(self, retention_days: float) -> None:
        self.retention_s = retention_days * 86400

    @abc.abstractmethod
    async def add(self, rows: list[pb.UsageRow]) -> None:
        """Add each row's sums to its hour's (``row.start`` any time in the hour)."""

    @abc.abstractmethod
    async def _rows(self, start: int, end: int, subject: str, sums: Sums) -> None:
        """Feed ``sums`` the hourly rows from ``start`` to ``end`` (of ``subject`` if set)."""

    async def query(self, request: pb.UsageQuery) -> pb.UsageReport:
        sums = Sums(Grouping.of(request.group_by))
        await self._rows(hour_of(request.start), request.end, request.subject, sums)
        return sums.report()

    async def spent(self, subject: str, since: int) -> pb.BudgetSpentReply:
        """What ``subject`` used from ``since`` (an hour's start) on, all models and routes."""
        sums = Sums(Grouping(None, ()))
        await self._rows(since, 2**62, subject, sums)
        total = sums.total
        return pb.BudgetSpentReply(
            tokens=total.prompt_tokens + total.completion_tokens, device_seconds=total.device_seconds
        )


def merge(rows: Iterable[pb.UsageRow]) -> list[pb.UsageRow]:
    """Rows of the same hour and key as one (a report's rows are written in one go)."""
    merged: dict[tuple, pb.UsageRow] = {}
    for row in rows:
        key = (hour_of(row.start), *(getattr(row, k) for k in KEY_FIELDS))
        if key not in merged:
            merged[key] = pb.UsageRow(start=key[0], **dict(zip(KEY_FIELDS, key[1:])))
        add_sums(merged[key], row)
    return list(merged.values())


class SqliteLedger(Ledger):
    """Table ``usage_hourly`` (migration 4), keyed by subject first: a tenant's query and
    a budget's sum read one index range."""

    PRUNE_EVERY_S = 60.0

    def __init__(self, db: Database, retention_days: float) -> None:
        super().__init__(retention_days)
        self.db = db
        self._pruned = 0.0

    async def add(self, rows: list[pb.UsageRow]) -> None:
        rows = merge(rows)
        prune = time.monotonic() - self._pruned > self.PRUNE_EVERY_S
        if prune:
            self._pruned = time.monotonic()
        oldest = hour_of(time.time() - self.retention_s)

        def add(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(
                    f"INSERT INTO usage_hourly (start, {', '.join(KEY_FIELDS)}, {', '.join(SUMS)}) "
                    f"VALUES ({', '.join('?' * (1 + len(KEY_FIELDS) + len(SUMS)))}) "
                    f"ON CONFLICT (subject, start, model, route, outcome) DO UPDATE SET "
                    + ", ".join(f"{s} = {s} + excluded.{s}" for s in SUMS),
                    [
                        (r.start, *(getattr(r, k) for k in KEY_FIELDS), *(getattr(r, s) for s in SUMS))
                        for r in rows
                        if r.start >= oldest
                    ],
                )
                if prune:
                    conn.execute("DELETE FROM usage_hourly WHERE start < ?", (oldest,))

        await self.db.run(add)

    async def _rows(self, start: int, end: int, subject: str, sums: Sums) -> None:
        columns = f"start, {', '.join(KEY_FIELDS)}, {', '.join(SUMS)}"

        def scan(conn: sqlite3.Connection) -> None:
            if subject:
                cursor = conn.execute(
                    f"SELECT {columns} FROM usage_hourly WHERE subject = ? AND start >= ? AND start < ?",
                    (subject, start, end),
                )
            else:
                cursor = conn.execute(
                    f"SELECT {columns} FROM usage_hourly WHERE start >= ? AND start < ?", (start, end)
                )
            names = ("start", *KEY_FIELDS, *SUMS)
            for values in cursor:
                sums.add(pb.UsageRow(**dict(zip(names, values))))

        await self.db.run(scan)


class RedisLedger(Ledger):
    """A hash per caller and hour, ``cyllm:usage:<hour start>:<subject>``, a field per
    model, route, outcome and sum (joined by a separator no name contains), HINCRBY'd by
    every coordinator at once without a lock, and a set per hour of the callers it has
    (``cyllm:usage:subjects:<hour start>``) for an admin's reading of everyone's: a
    caller's query and a budget's sum read that caller's hashes only.  Each key expires
    with the retention."""

    PREFIX = "cyllm:usage:"
    SEP = "\x1f"
    BATCH = 256

    def __init__(self, client: aioredis.Redis, retention_days: float) -> None:
        super().__init__(retention_days)
        self.r = client

    def _key(self, hour: int, subject: str) -> str:
        return f"{self.PREFIX}{hour}:{subject}"

    async def add(self, rows: list[pb.UsageRow]) -> None:
        oldest = hour_of(time.time() - self.retention_s)
        async with self.r.pipeline(transaction=False) as pipe:
            for row in merge(rows):
                if row.start < oldest:
                    continue
                key, expiry = self._key(row.start, row.subject), int(row.start + self.retention_s + HOUR)
                base = self.SEP.join(_clean(getattr(row, k)) for k in KEY_FIELDS[1:])
                for name in SUMS:
                    value = getattr(row, name)
                    if not value:
                        continue
                    field = f"{base}{self.SEP}{name}"
                    if isinstance(value, float):
                        pipe.hincrbyfloat(key, field, value)
                    else:
                        pipe.hincrby(key, field, value)
                pipe.expireat(key, expiry)
                pipe.sadd(f"{self.PREFIX}subjects:{row.start}", row.subject)
                pipe.expireat(f"{self.PREFIX}subjects:{row.start}", expiry)
            await pipe.execute()

    async def _rows(self, start: int, end: int, subject: str, sums: Sums) -> None:
        end = min(end, hour_of(time.time()) + HOUR)
        hours = list(range(max(hour_of(start), hour_of(time.time() - self.retention_s)), end, HOUR))
        wanted: list[tuple[int, str]]
        if subject:
            wanted = [(h, subject) for h in hours]
        else:
            wanted = []
            for i in range(0, len(hours), self.BATCH):
                async with self.r.pipeline(transaction=False) as pipe:
                    for h in hours[i : i + self.BATCH]:
                        pipe.smembers(f"{self.PREFIX}subjects:{h}")
                    members = await pipe.execute()
                for h, found in zip(hours[i : i + self.BATCH], members):
                    wanted += [(h, m.decode() if isinstance(m, bytes) else m) for m in sorted(found)]
        for i in range(0, len(wanted), self.BATCH):
            async with self.r.pipeline(transaction=False) as pipe:
                for h, who in wanted[i : i + self.BATCH]:
                    pipe.hgetall(self._key(h, who))
                replies = await pipe.execute()
            for (h, who), fields in zip(wanted[i : i + self.BATCH], replies):
                rows: dict[tuple[str, ...], pb.UsageRow] = {}
                for field, value in fields.items():
                    parts = (field.decode() if isinstance(field, bytes) else field).split(self.SEP)
                    if len(parts) != len(KEY_FIELDS) or parts[-1] not in SUMS:
                        continue
                    key, name = (who, *parts[:-1]), parts[-1]
                    row = rows.get(key)
                    if row is None:
                        row = rows[key] = pb.UsageRow(start=h, **dict(zip(KEY_FIELDS, key)))
                    number = float(value)
                    setattr(row, name, number if name == "device_seconds" else int(number))
                for row in rows.values():
                    sums.add(row)


def _clean(value: str) -> str:
    return value.replace(RedisLedger.SEP, " ")
