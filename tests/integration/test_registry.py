"""The model registry's contract, in the embedded default's SQLite file and in a real
Redis: records and who may see them, aliases moved atomically with their history, a
move that lost a race refused, deletion taking the model's aliases; and the SQLite file
written by two processes at once losing nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from cyllm import errors
from cyllm.coordinator.registry import EVERYONE, ModelRecord, RedisRegistry, SqliteRegistry
from cyllm.coordinator.sqlite import Database
from cyllm.protocol.tenant import PUBLIC, Tenant
from cyllm.shared_state import connect


@pytest.fixture(params=["sqlite", "redis"])
async def registries(request, tmp_path):
    """Two handles on one registry (two coordinators, or two processes' connections)."""
    if request.param == "sqlite":
        dbs = [Database(tmp_path / "state.db"), Database(tmp_path / "state.db")]
        for db in dbs:
            await db.start()
        yield SqliteRegistry(dbs[0]), SqliteRegistry(dbs[1])
        for db in dbs:
            await db.close()
        return
    url = request.getfixturevalue("redis_url")
    clients = [connect(url), connect(url)]
    yield RedisRegistry(clients[0]), RedisRegistry(clients[1])
    for c in clients:
        await c.aclose()


def record(model: str, owner: str = "key:alice", **kw) -> ModelRecord:
    return ModelRecord(model, owner, "base", "adapter", f"/jobs/{model}/adapter", **kw)


async def test_records_and_who_may_see_them(registries):
    a, b = registries
    await a.put(record("base:ft-1", evaluation={"eval_loss": 1.5}))
    await a.put(record("base:ft-2", published=["key:bob"]))
    await a.put(record("base:ft-3", published=[EVERYONE]))
    b._snapshot = None  # the other handle reads afresh
    got = await b.get("base:ft-1")
    assert got is not None and got.evaluation == {"eval_loss": 1.5} and got.path == "/jobs/base:ft-1/adapter"
    seen = await b.all()
    alice, bob, carol = (Tenant(f"key:{n}") for n in ("alice", "bob", "carol"))
    assert [alice.sees(seen[m]) for m in ("base:ft-1", "base:ft-2", "base:ft-3")] == [True, True, True]
    assert [bob.sees(seen[m]) for m in ("base:ft-1", "base:ft-2", "base:ft-3")] == [False, True, True]
    assert [carol.sees(seen[m]) for m in ("base:ft-1", "base:ft-2", "base:ft-3")] == [False, False, True]
    assert seen["base:ft-3"] == PUBLIC and Tenant("x", admin=True).sees(seen["base:ft-1"])
    assert await a.delete("base:ft-2") and not await a.delete("base:ft-2")
    b._snapshot = None
    assert await b.get("base:ft-2") is None


async def test_an_alias_moves_atomically_keeps_its_history_and_follows_deletes(registries):
    a, b = registries
    for i in (1, 2):
        await a.put(record(f"base:ft-{i}"))
    first = await a.move("key:alice", "support-bot", "base:ft-1", "key:alice", "first version")
    assert (first.from_model, first.to_model) == ("", "base:ft-1")
    await b.move(
        "key:alice", "support-bot", "base:ft-2", "job ftjob-x", "eval loss 1.2 < 1.5", expect="base:ft-1"
    )
    assert await a.alias("key:alice", "support-bot") == "base:ft-2"
    assert await a.alias("key:bob", "support-bot") is None  # each tenant's own names
    with pytest.raises(errors.InvalidRequest, match="moved meanwhile"):  # lost the race
        await a.move("key:alice", "support-bot", "base:ft-1", "key:alice", "rollback", expect="base:ft-1")
    moves = await b.moves("key:alice", "support-bot")
    assert [(m.from_model, m.to_model, m.by) for m in moves] == [
        ("", "base:ft-1", "key:alice"),
        ("base:ft-1", "base:ft-2", "job ftjob-x"),
    ]
    assert await a.aliases("key:alice") == {"support-bot": "base:ft-2"}
    await a.delete("base:ft-2")  # the alias pointed at it: gone with it
    assert await b.alias("key:alice", "support-bot") is None


async def test_concurrent_moves_of_one_alias_each_see_the_last(registries):
    a, b = registries
    for i in range(20):
        await a.put(record(f"base:ft-{i}"))
    await asyncio.gather(
        *((a if i % 2 else b).move("key:alice", "x", f"base:ft-{i}", "t", "r") for i in range(20))
    )
    moves = await a.moves("key:alice", "x")
    assert len(moves) == 20
    # a chain: each move starts where the one before it ended
    assert all(moves[i].from_model == moves[i - 1].to_model for i in range(1, 20))


WRITER = """
import asyncio, sys
from cyllm.coordinator.registry import ModelRecord, SqliteRegistry
from cyllm.coordinator.sqlite import Database

async def main(path, tag, n):
    db = Database(path)
    await db.start()
    registry = SqliteRegistry(db)
    for i in range(n):
        await registry.put(ModelRecord(f"base:{tag}-{i}", "key:a", "base", "adapter", "/x"))
        await registry.move("key:a", "shared", f"base:{tag}-{i}", tag, "r")
    await db.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_two_processes_writing_the_state_file_lose_nothing(tmp_path):
    """The gateway (hosting the coordinator) and a ``cyllm`` command on one file."""
    path = tmp_path / "state.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), tag, "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("gateway", "cli")
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err

    async def read() -> None:
        db = Database(path)
        await db.start()
        registry = SqliteRegistry(db)
        assert len(await registry.records()) == 120
        moves = await registry.moves("key:a", "shared")
        assert len(moves) == 120 and all(moves[i].from_model == moves[i - 1].to_model for i in range(1, 120))
        await db.close()

    asyncio.run(read())
