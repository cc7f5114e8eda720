"""The embedded default's state: one SQLite file that a restart of ``cyllm serve`` keeps.

With no Redis configured, a coordinator keeps what users made — training jobs and their
events, uploaded files' records, fine-tuned models and their aliases, idempotency
records — in ``coordinator.state_db``: SQLite in WAL mode (readers never wait for the
writer; a commit is durable once the next checkpoint runs, and survives a crash of the
process either way), its schema versioned by ``PRAGMA user_version`` and brought up to
date on start (``MIGRATIONS``: append, never edit).  What is lost with the process is
only what lives in its memory by design: the queue of waiting requests, the prompt
cache, the worker pool (workers register again within a heartbeat).

One connection, on one thread of its own: every query runs there (``Database.run``),
never on the event loop, and writes are serialised by it; other processes (the ``cyllm``
command on the same file) wait for the write lock up to ``BUSY_TIMEOUT_S``.  Each store
on it (``sqlite_jobs``, ``registry``) writes one change per transaction, so a crash
leaves the previous state or the next, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
BUSY_TIMEOUT_S = 30.0

# Version N is MIGRATIONS[N - 1]; a database at version N gets the scripts after it.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, record BLOB NOT NULL,
        cancel INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX jobs_by_creation ON jobs (created_at, id);
    CREATE TABLE job_events (
        job_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL, PRIMARY KEY (job_id, seq));
    CREATE TABLE job_queue (position INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE);
    CREATE TABLE job_leases (job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, until REAL NOT NULL);
    CREATE TABLE files (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, record BLOB NOT NULL);
    CREATE TABLE idempotency (
        key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, owner TEXT NOT NULL, expires REAL NOT NULL,
        result BLOB);
    CREATE TABLE models (id TEXT PRIMARY KEY, record TEXT NOT NULL);
    CREATE TABLE aliases (
        owner TEXT NOT NULL, name TEXT NOT NULL, model TEXT NOT NULL, PRIMARY KEY (owner, name));
    CREATE TABLE alias_moves (
        id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, name TEXT NOT NULL,
        from_model TEXT NOT NULL, to_model TEXT NOT NULL, by TEXT NOT NULL, at REAL NOT NULL,
        reason TEXT NOT NULL);
    """,
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL, record BLOB NOT NULL);
    CREATE INDEX responses_by_expiry ON responses (expires);
    CREATE INDEX responses_by_owner ON responses (owner, expires);
    """,
    """
    CREATE TABLE batches (
        id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, open INTEGER NOT NULL, record BLOB NOT NULL);
    CREATE INDEX batches_open ON batches (open, created_at, id);
    CREATE TABLE batch_leases (batch_id TEXT PRIMARY KEY, runner TEXT NOT NULL, until REAL NOT NULL);
    CREATE TABLE batch_results (
        batch_id TEXT NOT NULL, idx INTEGER NOT NULL, record BLOB NOT NULL, PRIMARY KEY (batch_id, idx));
    CREATE TABLE batch_cancels (batch_id TEXT PRIMARY KEY);
    """,
    """
    CREATE TABLE usage_hourly (
        subject TEXT NOT NULL, start INTEGER NOT NULL, model TEXT NOT NULL, route TEXT NOT NULL,
        outcome TEXT NOT NULL, requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        trained_tokens INTEGER NOT NULL, device_seconds REAL NOT NULL,
        PRIMARY KEY (subject, start, model, route, outcome));
    CREATE INDEX usage_by_hour ON usage_hourly (start);
    """,
)


class Database:
    def __init__(self, path: Path | str) -> None:
        """``path``: the file (made with its folder if absent), or ``:memory:``."""
        self.path = path
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cyllm-sqlite")
        self._conn: sqlite3.Connection | None = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        _write_ahead(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        migrate(conn)
        self._conn = conn

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """``work(connection)`` on the database's thread."""
        conn = self._conn
        if conn is None:
            raise RuntimeError("the database is not open: start() first")
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)


def _write_ahead(conn: sqlite3.Connection) -> None:
    """Switch a file to WAL. The switch needs the file to itself and SQLite answers "locked" at
    once, not after the busy timeout, while another process opens the same new file; so it is
    tried again within that timeout. A file already in WAL (every open after the first) is left."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One change: the write lock taken at its start (no upgrade deadlock), all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the last version, one script per transaction; the version is
    read inside it, so two processes opening a new file migrate it once."""
    while True:
        with transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"the state database is at schema version {version}, newer than this CY-LLM "
                    f"({len(MIGRATIONS)}): upgrade CY-LLM, or point coordinator.state_db elsewhere"
                )
            if version == len(MIGRATIONS):
                return
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")


def one(conn: sqlite3.Connection, sql: str, *args: Any) -> Any:
    """The first column of the first row (None when there is none)."""
    row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]
