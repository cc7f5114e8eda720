"""The job store's contract, in the embedded default's SQLite file and in a real Redis:
records, events in order, the queue (one claimant wins), leases that expire, the cancel
flag, files."""

from __future__ import annotations

import asyncio

import pytest

from cyllm.coordinator.redis_jobs import RedisJobStore
from cyllm.coordinator.sqlite import Database
from cyllm.coordinator.sqlite_jobs import SqliteJobStore
from cyllm.protocol import pb


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request, tmp_path):
    """Two handles on one store (two coordinators; for SQLite, two connections to one
    file, as two processes have)."""
    if request.param == "sqlite":
        dbs = [Database(tmp_path / "state.db"), Database(tmp_path / "state.db")]
        for db in dbs:
            await db.start()
        yield SqliteJobStore(dbs[0]), SqliteJobStore(dbs[1])
        for db in dbs:
            await db.close()
        return
    url = request.getfixturevalue("redis_url")
    a, b = RedisJobStore(url), RedisJobStore(url)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


def _job(i: int, **kw) -> pb.TrainingJob:
    return pb.TrainingJob(id=f"ftjob-{i}", spec_json="{}", state="queued", created_at=1000 + i, **kw)


async def test_records_listing_and_events(stores):
    a, b = stores
    for i in range(5):
        await a.put(_job(i))
    job = await b.get("ftjob-3")
    assert job.state == "queued" and not job.cancel_requested
    job.state = "running"
    job.progress.step = 7
    await b.put(job)
    assert (await a.get("ftjob-3")).progress.step == 7
    assert await a.get("nope") is None
    page, more = await a.page(2)
    assert [j.id for j in page] == ["ftjob-4", "ftjob-3"] and more
    page, more = await a.page(10, after="ftjob-3")
    assert [j.id for j in page] == ["ftjob-2", "ftjob-1", "ftjob-0"] and not more
    seqs = [
        await (a if i % 2 else b).append_event("ftjob-3", pb.TrainingEvent(message=f"m{i}")) for i in range(5)
    ]
    assert seqs == [1, 2, 3, 4, 5]
    assert [e.message for e in await b.events("ftjob-3", after_seq=2)] == ["m2", "m3", "m4"]
    assert [e.seq for e in await b.events("ftjob-3", after_seq=1, limit=2)] == [2, 3]


async def test_queue_claims_leases_and_cancel(stores):
    a, b = stores
    for i in range(3):
        await a.put(_job(i))
        await a.enqueue(f"ftjob-{i}")
    await a.enqueue("ftjob-0")  # twice: still once, in its place
    assert await b.queued() == ["ftjob-0", "ftjob-1", "ftjob-2"]
    wins = await asyncio.gather(a.claim("ftjob-1", "A", 0.3), b.claim("ftjob-1", "B", 0.3))
    assert sorted(wins) == [False, True]
    owner = "A" if wins[0] else "B"
    assert await (a if owner == "A" else b).renew("ftjob-1", owner, 0.3)
    assert not await a.renew("ftjob-1", "someone else", 0.3)
    assert await a.expired() == []
    await asyncio.sleep(0.5)
    assert await b.expired() == ["ftjob-1"]
    await a.release("ftjob-1")
    assert await b.expired() == []
    assert await a.dequeue("ftjob-2") and not await a.dequeue("ftjob-2")
    assert await b.queued() == ["ftjob-0"]
    await b.request_cancel("ftjob-0")
    assert await a.cancel_requested("ftjob-0") and (await a.get("ftjob-0")).cancel_requested
    await a.put(await a.get("ftjob-0"))  # a record write keeps the flag
    assert await b.cancel_requested("ftjob-0")


async def test_files(stores):
    a, b = stores
    await a.put_file(pb.FileInfo(id="file-2", filename="b.jsonl", created_at=2, path="/x/b"))
    await a.put_file(pb.FileInfo(id="file-1", filename="a.jsonl", created_at=1, path="/x/a"))
    assert [f.id for f in await b.files()] == ["file-1", "file-2"]
    assert (await b.get_file("file-2")).path == "/x/b"
    assert await b.delete_file("file-2") and not await a.delete_file("file-2")
    assert await a.get_file("file-2") is None
