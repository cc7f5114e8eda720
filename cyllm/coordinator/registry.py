"""The models users made, and the names they give them: what a restart must not lose.

Base models are what workers are configured with (their catalogs, told at
registration).  Every model made here — a fine-tune's result — is a **record** in the
registry: its id (what requests name), its owner, the base it was trained from, its
kind (an ``adapter`` served beside its base, a ``peft`` adapter applied to a model of
its own, or ``model``: full weights), where its artefact lives (a folder on storage
the workers read, as ``coordinator.files_dir`` is), the job that made it, its
evaluation, whom it is published to, and how long it stays loaded unused
(``keep_alive_s``).  A record outlives every process: after a worker restarts or drops
the model, the next request loads it again from the record (``coordinator/loading.py``).

An **alias** is a tenant's stable name for one of the models it may use
(``support-bot`` -> ``smollm2:ft-support-3``); requests to it reach the current target.
Moving an alias is one atomic change, recorded (by whom, when, from, to, why), and can
be rolled back to where it was before.

Who may see a model (the scheduler's and the services' one answer, ``owners.py``): its
owner and admins; the tenants it is published to, or everyone when published to all.

``SqliteRegistry`` keeps this in the embedded default's state file; ``RedisRegistry``
in Redis, shared by every coordinator.
"""

from __future__ import annotations

import abc
import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import redis.asyncio as aioredis

from cyllm import errors
from cyllm.coordinator.owners import OWNERS_KEY, ModelOwners
from cyllm.coordinator.sqlite import Database, one, transaction
from cyllm.protocol import pb
from cyllm.protocol.tenant import PUBLIC
from cyllm.shared_state import text
from cyllm.training.spec import KEEP_ALIVE_S

EVERYONE = "*"
KINDS = ("adapter", "peft", "model")


@dataclass
class ModelRecord:
    id: str
    owner: str
    base: str
    kind: str  # "adapter" | "peft" | "model"
    path: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    job_id: str = ""
    evaluation: dict[str, float] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)  # tenants; ["*"]: everyone
    keep_alive_s: float = KEEP_ALIVE_S
    # Deleted: kept as a tombstone, so that its id is never taken again and a copy a
    # worker still holds (one unreachable during the delete) is seen by admins only.
    deleted: bool = False

    @property
    def visibility(self) -> str:
        """Who may see it, as the owners map holds it (``Tenant.sees`` reads it)."""
        if self.deleted:
            return json.dumps([])
        if EVERYONE in self.published:
            return PUBLIC
        return json.dumps([self.owner, *self.published])

    def load_request(self) -> pb.LoadModelRequest:
        """What a worker is asked to serve it with (and for how long unused)."""
        if self.kind == "adapter":
            return pb.LoadModelRequest(model=self.id, adapter_path=self.path, keep_alive_s=self.keep_alive_s)
        load = pb.LoadModelRequest(model=self.id, from_model=self.base, keep_alive_s=self.keep_alive_s)
        if self.kind == "model":
            load.model_path = self.path
        else:
            load.peft_adapter_path = self.path
        return load

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def of_json(cls, raw: str | bytes) -> ModelRecord:
        return cls(**json.loads(raw))


def served_as(base: str, name: str, kind: str) -> str:
    """The model id a result of ``kind`` is served as: an adapter beside its base
    (``base:name``), else a model of its own (``base-name``)."""
    return f"{base}:{name}" if kind == "adapter" else f"{base}-{name}"


@dataclass(frozen=True)
class AliasMove:
    owner: str
    name: str
    from_model: str  # '' when the alias was new
    to_model: str
    by: str
    at: float
    reason: str


@dataclass
class Snapshot:
    """The registry as one read found it: what a request reads (never a query each).
    ``models``: the live records; ``visibility``: who may see each id, tombstones too."""

    models: dict[str, ModelRecord]
    aliases: dict[tuple[str, str], str]  # (owner, name) -> model
    visibility: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.visibility = {mid: r.visibility for mid, r in self.models.items()}
        self.models = {mid: r for mid, r in self.models.items() if not r.deleted}


class Registry(ModelOwners, abc.ABC):
    """Model records and aliases; ``all()`` (``ModelOwners``) is who may see each.  What
    a request reads (who may see a model, where an alias points) comes from a snapshot
    at most ``SNAPSHOT_S`` old, renewed at once after this process's own writes; another
    process's write (another coordinator, the ``cyllm`` command) shows within it."""

    SNAPSHOT_S: ClassVar[float] = 0.5

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._read_at = 0.0

    # -- records
    @abc.abstractmethod
    async def _load_all(self) -> Snapshot: ...

    @abc.abstractmethod
    async def _store(self, record: ModelRecord) -> None: ...

    @abc.abstractmethod
    async def _remove(self, model: str) -> bool: ...

    async def snapshot(self) -> Snapshot:
        if self._snapshot is None or time.monotonic() - self._read_at > self.SNAPSHOT_S:
            self._snapshot, self._read_at = await self._load_all(), time.monotonic()
        return self._snapshot

    async def records(self) -> dict[str, ModelRecord]:
        """Every record, as of at most ``SNAPSHOT_S`` ago (or this process's last write)."""
        return (await self.snapshot()).models

    async def get(self, model: str) -> ModelRecord | None:
        return (await self.records()).get(model)

    async def resolve(self, owner: str, name: str) -> str | None:
        """Where ``owner``'s alias ``name`` points (None: it is no alias of theirs)."""
        return (await self.snapshot()).aliases.get((owner, name))

    async def taken(self, model: str) -> bool:
        """Whether ``model`` names a record, live or deleted (an id is never reused)."""
        return model in (await self._load_all()).visibility

    async def put(self, record: ModelRecord) -> None:
        if record.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        await self._store(record)
        self._snapshot = None

    async def delete(self, model: str) -> bool:
        """Make the record a tombstone and drop the aliases that point at it."""
        removed = await self._remove(model)
        self._snapshot = None
        return removed

    async def all(self) -> dict[str, str]:
        return (await self.snapshot()).visibility

    # -- aliases
    @abc.abstractmethod
    async def alias(self, owner: str, name: str) -> str | None:
        """The model ``owner``'s alias ``name`` points at, or None."""

    @abc.abstractmethod
    async def aliases(self, owner: str) -> dict[str, str]: ...

    async def move(
        self, owner: str, name: str, model: str, by: str, reason: str, expect: str | None = None
    ) -> AliasMove:
        """Point the alias at ``model`` (one atomic change, recorded); with ``expect``,
        only if it still points there (else InvalidRequest: it moved meanwhile)."""
        done = await self._move(owner, name, model, by, reason, expect)
        self._snapshot = None
        return done

    async def drop_alias(self, owner: str, name: str) -> bool:
        dropped = await self._drop(owner, name)
        self._snapshot = None
        return dropped

    @abc.abstractmethod
    async def _move(
        self, owner: str, name: str, model: str, by: str, reason: str, expect: str | None
    ) -> AliasMove: ...

    @abc.abstractmethod
    async def _drop(self, owner: str, name: str) -> bool: ...

    @abc.abstractmethod
    async def moves(self, owner: str, name: str) -> list[AliasMove]:
        """The alias's moves, oldest first."""


def conflict(owner: str, name: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"alias {name!r} moved meanwhile; read it again", param="alias")


class SqliteRegistry(Registry):
    def __init__(self, db: Database) -> None:
        super().__init__()
        self.db = db

    async def _load_all(self) -> Snapshot:
        def read(conn: sqlite3.Connection) -> Snapshot:
            models = [ModelRecord.of_json(row[0]) for row in conn.execute("SELECT record FROM models")]
            aliases = conn.execute("SELECT owner, name, model FROM aliases").fetchall()
            return Snapshot({r.id: r for r in models}, {(o, n): m for o, n, m in aliases})

        return await self.db.run(read)

    async def _store(self, record: ModelRecord) -> None:
        await self.db.run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO models (id, record) VALUES (?, ?)", (record.id, record.to_json())
            )
        )

    async def _remove(self, model: str) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                conn.execute("DELETE FROM aliases WHERE model = ?", (model,))
                raw = one(conn, "SELECT record FROM models WHERE id = ?", model)
                if raw is None or (record := ModelRecord.of_json(raw)).deleted:
                    return False
                record.deleted = True
                conn.execute("UPDATE models SET record = ? WHERE id = ?", (record.to_json(), model))
                return True

        return await self.db.run(remove)

    async def alias(self, owner: str, name: str) -> str | None:
        return await self.db.run(
            lambda c: one(c, "SELECT model FROM aliases WHERE owner = ? AND name = ?", owner, name)
        )

    async def aliases(self, owner: str) -> dict[str, str]:
        rows = await self.db.run(
            lambda c: c.execute("SELECT name, model FROM aliases WHERE owner = ?", (owner,)).fetchall()
        )
        return dict(rows)

    async def _move(
        self, owner: str, name: str, model: str, by: str, reason: str, expect: str | None
    ) -> AliasMove:
        def move(conn: sqlite3.Connection) -> AliasMove:
            with transaction(conn):
                now = one(conn, "SELECT model FROM aliases WHERE owner = ? AND name = ?", owner, name) or ""
                if expect is not None and now != expect:
                    raise conflict(owner, name)
                done = AliasMove(owner, name, now, model, by, time.time(), reason)
                conn.execute(
                    "INSERT OR REPLACE INTO aliases (owner, name, model) VALUES (?, ?, ?)",
                    (owner, name, model),
                )
                conn.execute(
                    "INSERT INTO alias_moves (owner, name, from_model, to_model, by, at, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (owner, name, done.from_model, model, by, done.at, reason),
                )
                return done

        return await self.db.run(move)

    async def moves(self, owner: str, name: str) -> list[AliasMove]:
        rows = await self.db.run(
            lambda c: c.execute(
                "SELECT owner, name, from_model, to_model, by, at, reason FROM alias_moves "
                "WHERE owner = ? AND name = ? ORDER BY id",
                (owner, name),
            ).fetchall()
        )
        return [AliasMove(*row) for row in rows]

    async def _drop(self, owner: str, name: str) -> bool:
        cursor = await self.db.run(
            lambda c: c.execute("DELETE FROM aliases WHERE owner = ? AND name = ?", (owner, name))
        )
        return cursor.rowcount > 0


_MOVE = """
local now = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if ARGV[3] ~= '\\0' and now ~= ARGV[3] then return {0, now} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local move = cjson.decode(ARGV[4])
move['from_model'] = now
redis.call('RPUSH', KEYS[2], cjson.encode(move))
return {1, now}
"""


class RedisRegistry(Registry):
    """``cyllm:models`` id -> record (JSON), with ``cyllm:model_owners`` (who may see
    each, read by the scheduler's pool script) kept beside it in the same transaction;
    ``cyllm:aliases`` "owner NUL name" -> model, ``cyllm:alias_moves:<owner NUL name>`` a
    list of moves (JSON)."""

    MODELS = "cyllm:models"
    ALIASES = "cyllm:aliases"
    key = OWNERS_KEY  # the scheduler reads who may see each model here

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__()
        self.r = client
        self._move_script = client.register_script(_MOVE)

    async def _load_all(self) -> Snapshot:
        async with self.r.pipeline(transaction=True) as p:
            p.hgetall(self.MODELS)
            p.hgetall(self.ALIASES)
            models, aliases = await p.execute()
        pairs = {tuple(text(k).split("\0", 1)): text(v) for k, v in aliases.items()}
        return Snapshot(
            {text(k): ModelRecord.of_json(v) for k, v in models.items()},
            {(p[0], p[1]): model for p, model in pairs.items()},
        )

    async def _store(self, record: ModelRecord) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.MODELS, record.id, record.to_json())
            p.hset(OWNERS_KEY, record.id, record.visibility)
            await p.execute()

    async def _remove(self, model: str) -> bool:
        raw = await self.r.hget(self.MODELS, model)
        if raw is None or (record := ModelRecord.of_json(raw)).deleted:
            return False
        record.deleted = True
        aliases = {text(k): text(v) for k, v in (await self.r.hgetall(self.ALIASES)).items()}
        async with self.r.pipeline(transaction=True) as p:
            p.hset(self.MODELS, model, record.to_json())
            p.hset(OWNERS_KEY, model, record.visibility)
            for key, target in aliases.items():
                if target == model:
                    p.hdel(self.ALIASES, key)
            await p.execute()
        return True

    @staticmethod
    def _field(owner: str, name: str) -> str:
        return f"{owner}\0{name}"

    async def alias(self, owner: str, name: str) -> str | None:
        found = await self.r.hget(self.ALIASES, self._field(owner, name))
        return None if found is None else text(found)

    async def aliases(self, owner: str) -> dict[str, str]:
        rows = await self.r.hgetall(self.ALIASES)
        prefix = f"{owner}\0"
        return {text(k)[len(prefix) :]: text(v) for k, v in rows.items() if text(k).startswith(prefix)}

    async def _move(
        self, owner: str, name: str, model: str, by: str, reason: str, expect: str | None
    ) -> AliasMove:
        field_ = self._field(owner, name)
        at = time.time()
        done, now = await self._move_script(  # the script adds what it moved from
            keys=[self.ALIASES, f"cyllm:alias_moves:{field_}"],
            args=[
                field_,
                model,
                "\0" if expect is None else expect,
                json.dumps({"to_model": model, "by": by, "at": at, "reason": reason}),
            ],
        )
        if not int(done):
            raise conflict(owner, name)
        return AliasMove(owner, name, text(now), model, by, at, reason)

    async def moves(self, owner: str, name: str) -> list[AliasMove]:
        rows = await self.r.lrange(f"cyllm:alias_moves:{self._field(owner, name)}", 0, -1)
        moves: list[dict[str, Any]] = [json.loads(row) for row in rows]
        return [
            AliasMove(owner, name, m["from_model"], m["to_model"], m["by"], m["at"], m["reason"])
            for m in moves
        ]

    async def _drop(self, owner: str, name: str) -> bool:
        return bool(await self.r.hdel(self.ALIASES, self._field(owner, name)))
