"""``JobStore`` and ``IdempotencyStore`` in the embedded default's SQLite file
(``sqlite.py``): tables ``jobs`` (the serialized ``TrainingJob`` and its cancel flag),
``job_events`` (numbered per job), ``job_queue`` (FIFO by position), ``job_leases``
(the coordinator following a running job, and until when: wall-clock time, since the
file outlives the process), ``files`` (uploads' records), ``responses`` (stored
Responses API responses, until they expire), ``batches`` with ``batch_leases`` (the
gateway running one), ``batch_results`` (a line's first result) and ``batch_cancels``, and ``idempotency``.

A lease left by a coordinator that died (``cyllm serve`` stopped mid-job, killed, the
machine rebooted) expires like any other: the restarted coordinator puts the job back
in the queue, and it resumes from its last checkpoint.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from cyllm.coordinator.cache import CachedResponse, decode, encode
from cyllm.coordinator.idempotency import Claim, IdempotencyStore
from cyllm.coordinator.jobs import FINAL_BATCH, JobStore
from cyllm.coordinator.sqlite import Database, one, transaction
from cyllm.protocol import pb


class SqliteJobStore(JobStore):
    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def put(self, job: pb.TrainingJob) -> None:
        record = pb.TrainingJob()
        record.CopyFrom(job)
        record.cancel_requested = False  # the flag lives in its own column

        def put(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO jobs (id, created_at, record) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                (job.id, job.created_at, record.SerializeToString()),
            )

        await self.db.run(put)

    async def get(self, job_id: str) -> pb.TrainingJob | None:
        row = await self.db.run(
            lambda c: c.execute("SELECT record, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        )
        return None if row is None else _job(*row)

    async def page(self, limit: int, after: str = "") -> tuple[list[pb.TrainingJob], bool]:
        def page(conn: sqlite3.Connection) -> list[tuple[bytes, int]] | None:
            if not after:
                return conn.execute(
                    "SELECT record, cancel FROM jobs ORDER BY created_at DESC, id DESC LIMIT ?", (limit + 1,)
                ).fetchall()
            cursor = conn.execute("SELECT created_at, id FROM jobs WHERE id = ?", (after,)).fetchone()
            if cursor is None:
                return None
            return conn.execute(
                "SELECT record, cancel FROM jobs WHERE (created_at, id) < (?, ?) "
                "ORDER BY created_at DESC, id DESC LIMIT ?",
                (*cursor, limit + 1),
            ).fetchall()

        rows = await self.db.run(page)
        if rows is None:
            return [], False
        return [_job(*row) for row in rows[:limit]], len(rows) > limit

    async def append_event(self, job_id: str, event: pb.TrainingEvent) -> int:
        def append(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                seq = one(conn, "SELECT COALESCE(MAX(seq), 0) + 1 FROM job_events WHERE job_id = ?", job_id)
                event.seq = seq
                conn.execute(
                    "INSERT INTO job_events (job_id, seq, event) VALUES (?, ?, ?)",
                    (job_id, seq, event.SerializeToString()),
                )
                return int(seq)

        return await self.db.run(append)

    async def events(self, job_id: str, after_seq: int = 0, limit: int = 0) -> list[pb.TrainingEvent]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT event FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, after_seq, limit or -1),
            ).fetchall()
        )
        return [pb.TrainingEvent.FromString(row[0]) for row in rows]

    async def request_cancel(self, job_id: str) -> None:
        await self.db.run(lambda c: c.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,)))

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.db.run(lambda c: one(c, "SELECT cancel FROM jobs WHERE id = ?", job_id)))

    async def enqueue(self, job_id: str) -> None:
        await self.db.run(
            lambda c: c.execute("INSERT OR IGNORE INTO job_queue (job_id) VALUES (?)", (job_id,))
        )

    async def dequeue(self, job_id: str) -> bool:
        cursor = await self.db.run(lambda c: c.execute("DELETE FROM job_queue WHERE job_id = ?", (job_id,)))
        return cursor.rowcount > 0

    async def queued(self) -> list[str]:
        rows = await self.db.run(
            lambda c: c.execute("SELECT job_id FROM job_queue ORDER BY position").fetchall()
        )
        return [row[0] for row in rows]

    async def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        until = self.clock() + lease_s

        def claim(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                if conn.execute("DELETE FROM job_queue WHERE job_id = ?", (job_id,)).rowcount == 0:
                    return False
                conn.execute(
                    "INSERT OR REPLACE INTO job_leases (job_id, owner, until) VALUES (?, ?, ?)",
                    (job_id, owner, until),
                )
                return True

        return await self.db.run(claim)

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        cursor = await self.db.run(
            lambda c: c.execute(
                "UPDATE job_leases SET until = ? WHERE job_id = ? AND owner = ?",
                (self.clock() + lease_s, job_id, owner),
            )
        )
        return cursor.rowcount > 0

    async def release(self, job_id: str) -> None:
        await self.db.run(lambda c: c.execute("DELETE FROM job_leases WHERE job_id = ?", (job_id,)))

    async def expired(self) -> list[str]:
        rows = await self.db.run(
            lambda c: c.execute("SELECT job_id FROM job_leases WHERE until < ?", (self.clock(),)).fetchall()
        )
        return [row[0] for row in rows]

    async def put_file(self, info: pb.FileInfo) -> None:
        await self.db.run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO files (id, created_at, record) VALUES (?, ?, ?)",
                (info.id, info.created_at, info.SerializeToString()),
            )
        )

    async def get_file(self, file_id: str) -> pb.FileInfo | None:
        raw = await self.db.run(lambda c: one(c, "SELECT record FROM files WHERE id = ?", file_id))
        return None if raw is None else pb.FileInfo.FromString(raw)

    async def files(self) -> list[pb.FileInfo]:
        rows = await self.db.run(
            lambda c: c.execute("SELECT record FROM files ORDER BY created_at, id").fetchall()
        )
        return [pb.FileInfo.FromString(row[0]) for row in rows]

    async def delete_file(self, file_id: str) -> bool:
        cursor = await self.db.run(lambda c: c.execute("DELETE FROM files WHERE id = ?", (file_id,)))
        return cursor.rowcount > 0

    async def put_response(self, response: pb.StoredResponse, ttl_s: float, keep: int) -> None:
        now = self.clock()

        def put(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute("DELETE FROM responses WHERE expires < ?", (now,))  # kept bounded
                conn.execute(
                    "INSERT OR REPLACE INTO responses (id, owner, expires, record) VALUES (?, ?, ?, ?)",
                    (response.id, response.owner, now + ttl_s, response.SerializeToString()),
                )
                conn.execute(  # the owner's oldest beyond ``keep``
                    "DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE owner = ? "
                    "ORDER BY expires DESC LIMIT -1 OFFSET ?)",
                    (response.owner, keep),
                )

        await self.db.run(put)

    async def get_response(self, response_id: str) -> pb.StoredResponse | None:
        raw = await self.db.run(
            lambda c: one(
                c, "SELECT record FROM responses WHERE id = ? AND expires >= ?", response_id, self.clock()
            )
        )
        return None if raw is None else pb.StoredResponse.FromString(raw)

    async def delete_response(self, response_id: str) -> bool:
        cursor = await self.db.run(lambda c: c.execute("DELETE FROM responses WHERE id = ?", (response_id,)))
        return cursor.rowcount > 0

    async def put_batch(self, batch: pb.Batch) -> None:
        await self.db.run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO batches (id, created_at, open, record) VALUES (?, ?, ?, ?)",
                (batch.id, batch.created_at, batch.status not in FINAL_BATCH, batch.SerializeToString()),
            )
        )

    async def get_batch(self, batch_id: str) -> pb.Batch | None:
        raw = await self.db.run(lambda c: one(c, "SELECT record FROM batches WHERE id = ?", batch_id))
        return None if raw is None else pb.Batch.FromString(raw)

    async def batches(self, open_only: bool = False) -> list[pb.Batch]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT record FROM batches WHERE open >= ? ORDER BY created_at, id", (int(open_only),)
            ).fetchall()
        )
        return [pb.Batch.FromString(row[0]) for row in rows]

    async def claim_batch(self, batch_id: str, runner: str, lease_s: float) -> bool:
        now = self.clock()

        def claim(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO batch_leases (batch_id, runner, until) VALUES (?, ?, ?) "
                "ON CONFLICT (batch_id) DO UPDATE SET runner = excluded.runner, until = excluded.until "
                "WHERE batch_leases.runner = excluded.runner OR batch_leases.until < ?",
                (batch_id, runner, now + lease_s, now),
            )
            return cursor.rowcount > 0

        return await self.db.run(claim)

    async def release_batch(self, batch_id: str, runner: str) -> None:
        await self.db.run(
            lambda c: c.execute(
                "DELETE FROM batch_leases WHERE batch_id = ? AND runner = ?", (batch_id, runner)
            )
        )

    async def add_batch_results(self, batch_id: str, results: list[pb.BatchResult]) -> list[pb.BatchResult]:
        def add(conn: sqlite3.Connection) -> list[pb.BatchResult]:
            with transaction(conn):
                return [
                    r
                    for r in results
                    if conn.execute(
                        "INSERT OR IGNORE INTO batch_results (batch_id, idx, record) VALUES (?, ?, ?)",
                        (batch_id, r.index, r.SerializeToString()),
                    ).rowcount
                ]

        return await self.db.run(add)

    async def batch_done(self, batch_id: str) -> list[int]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT idx FROM batch_results WHERE batch_id = ? ORDER BY idx", (batch_id,)
            ).fetchall()
        )
        return [row[0] for row in rows]

    async def batch_results(self, batch_id: str, start: int, stop: int) -> list[pb.BatchResult]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT record FROM batch_results WHERE batch_id = ? AND idx >= ? AND idx < ? ORDER BY idx",
                (batch_id, start, stop),
            ).fetchall()
        )
        return [pb.BatchResult.FromString(row[0]) for row in rows]

    async def drop_batch_results(self, batch_id: str) -> None:
        await self.db.run(lambda c: c.execute("DELETE FROM batch_results WHERE batch_id = ?", (batch_id,)))

    async def cancel_batch(self, batch_id: str) -> None:
        await self.db.run(
            lambda c: c.execute("INSERT OR IGNORE INTO batch_cancels (batch_id) VALUES (?)", (batch_id,))
        )

    async def batch_cancelled(self, batch_id: str) -> bool:
        return bool(
            await self.db.run(lambda c: one(c, "SELECT 1 FROM batch_cancels WHERE batch_id = ?", batch_id))
        )


def _job(record: bytes, cancel: int) -> pb.TrainingJob:
    job = pb.TrainingJob.FromString(record)
    job.cancel_requested = bool(cancel)
    return job


class SqliteIdempotencyStore(IdempotencyStore):
    """Claims expire by their lease while running and by the TTL once done (wall-clock
    times: a record outlives a restart, so a retry after one gets the first answer)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def claim(self, key: str, fingerprint: str, owner: str, lease_s: float) -> Claim:
        now = self.clock()

        def claim(conn: sqlite3.Connection) -> Claim:
            with transaction(conn):
                row = conn.execute(
                    "SELECT fingerprint, expires, result FROM idempotency WHERE key = ?", (key,)
                ).fetchone()
                if row is None or row[1] <= now:
                    conn.execute("DELETE FROM idempotency WHERE expires <= ?", (now,))  # housekeeping
                    conn.execute(
                        "INSERT OR REPLACE INTO idempotency (key, fingerprint, owner, expires, result) "
                        "VALUES (?, ?, ?, ?, NULL)",
                        (key, fingerprint, owner, now + lease_s),
                    )
                    return Claim(claimed=True)
                if row[0] != fingerprint:
                    return Claim(conflict=True)
                return Claim(result=decode(row[2]) if row[2] is not None else None)

        return await self.db.run(claim)

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        await self.db.run(
            lambda c: c.execute(
                "UPDATE idempotency SET expires = ? WHERE key = ? AND owner = ? AND result IS NULL",
                (self.clock() + lease_s, key, owner),
            )
        )

    async def finish(self, key: str, owner: str, result: CachedResponse, ttl_s: float) -> None:
        await self.db.run(
            lambda c: c.execute(
                "UPDATE idempotency SET result = ?, expires = ? WHERE key = ? AND owner = ?",
                (encode(result), self.clock() + ttl_s, key, owner),
            )
        )

    async def release(self, key: str, owner: str) -> None:
        await self.db.run(
            lambda c: c.execute(
                "DELETE FROM idempotency WHERE key = ? AND owner = ? AND result IS NULL", (key, owner)
            )
        )
