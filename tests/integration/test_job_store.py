"""The job store's contract, in the embedded default's SQLite file and in a real Redis:
records, events in order, the queue (one claimant wins), leases that expire, the cancel
flag, files; the idempotency store's; and the state file across a restart."""

from __future__ import annotations

import asyncio
import functools

import pytest
import redis.asyncio

from cyllm.coordinator.cache import CachedResponse
from cyllm.coordinator.idempotency import RedisIdempotencyStore
from cyllm.coordinator.jobs import MemoryJobStore
from cyllm.coordinator.redis_jobs import RedisJobStore
from cyllm.coordinator.registry import ModelRecord, SqliteRegistry
from cyllm.coordinator.sqlite import Database
from cyllm.coordinator.sqlite_jobs import SqliteIdempotencyStore, SqliteJobStore
from cyllm.protocol import pb
from tests.polling import until


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


@pytest.fixture(params=["sqlite", "redis"])
async def idempotency(request, tmp_path):
    """Two handles on one idempotency store (two coordinators)."""
    if request.param == "sqlite":
        dbs = [Database(tmp_path / "state.db"), Database(tmp_path / "state.db")]
        for db in dbs:
            await db.start()
        yield SqliteIdempotencyStore(dbs[0]), SqliteIdempotencyStore(dbs[1])
        for db in dbs:
            await db.close()
        return
    client = redis.asyncio.Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisIdempotencyStore(client), RedisIdempotencyStore(client)
    await client.aclose()


async def test_idempotency_claims_results_conflicts_and_leases(idempotency):
    a, b = idempotency
    answer = CachedResponse(("Hello", " there"), "stop", 3, 2)
    assert (await a.claim("k", "fp", "coord-a", 30)).claimed
    running = await b.claim("k", "fp", "coord-b", 30)
    assert not running.claimed and running.result is None and not running.conflict
    assert (await b.claim("k", "other request", "coord-b", 30)).conflict
    await a.finish("k", "coord-a", answer, 60)
    assert (await b.claim("k", "fp", "coord-b", 30)).result == answer
    # a failed generation keeps nothing; an abandoned claim lapses with its lease
    assert (await a.claim("gone", "fp", "coord-a", 30)).claimed
    await a.release("gone", "coord-a")
    assert (await b.claim("gone", "fp", "coord-b", 0.3)).claimed
    await until(lambda: a.claim("gone", "fp", "coord-a", 30), lambda c: c.claimed, timeout=10)


async def test_the_state_file_keeps_everything_across_a_restart(tmp_path):
    """A coordinator restarted on its state file finds what it wrote: jobs with their
    events and queue, files, idempotency results, models and aliases."""
    answer = CachedResponse(("Hi",), "stop", 1, 1)
    db = Database(tmp_path / "state.db")
    await db.start()
    jobs, registry = SqliteJobStore(db), SqliteRegistry(db)
    await jobs.put(_job(1))
    await jobs.append_event("ftjob-1", pb.TrainingEvent(type="state", message="created"))
    await jobs.enqueue("ftjob-1")
    await jobs.put_file(pb.FileInfo(id="file-1", filename="a.jsonl", bytes=3, owner="key:a", path="/f"))
    store = SqliteIdempotencyStore(db)
    assert (await store.claim("k", "fp", "coord", 30)).claimed
    await store.finish("k", "coord", answer, 600)
    await registry.put(
        ModelRecord("base:ft-1", "key:a", "base", "adapter", "/x", evaluation={"eval_loss": 1.5})
    )
    await registry.move("key:a", "bot", "base:ft-1", "key:a", "set")
    await db.close()

    db = Database(tmp_path / "state.db")
    await db.start()
    jobs, registry = SqliteJobStore(db), SqliteRegistry(db)
    assert (await jobs.get("ftjob-1")).state == "queued"
    assert [e.message for e in await jobs.events("ftjob-1", 0)] == ["created"]
    assert await jobs.queued() == ["ftjob-1"]
    assert (await jobs.get_file("file-1")).filename == "a.jsonl"
    assert (await SqliteIdempotencyStore(db).claim("k", "fp", "coord-2", 30)).result == answer
    assert (await registry.get("base:ft-1")).evaluation == {"eval_loss": 1.5}
    assert await registry.alias("key:a", "bot") == "base:ft-1"
    await db.close()


async def test_stored_responses_expire_and_each_owner_keeps_at_most_its_cap(stores):
    """/v1/responses' store: shared by both handles, gone after its TTL, and an owner's
    oldest go first beyond the cap, never another owner's."""
    memory = MemoryJobStore()
    for a, b in [stores, (memory, memory)]:
        for i in range(3):
            await a.put_response(pb.StoredResponse(id=f"resp_a{i}", owner="alice"), ttl_s=60 + i, keep=2)
        await a.put_response(pb.StoredResponse(id="resp_b0", owner="bob"), ttl_s=60, keep=2)
        assert await b.get_response("resp_a0") is None  # alice's oldest, past her cap of 2
        assert (await b.get_response("resp_a2")).owner == "alice"
        assert (await b.get_response("resp_b0")).owner == "bob"
        await a.put_response(pb.StoredResponse(id="resp_short", owner="bob"), ttl_s=0.2, keep=2)
        await until(functools.partial(b.get_response, "resp_short"), lambda found: found is None, timeout=10)
        assert await b.delete_response("resp_a2") and await b.get_response("resp_a2") is None


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def batch_stores(request, tmp_path):
    """Two handles on one store (memory: the same store twice)."""
    if request.param == "memory":
        store = MemoryJobStore()
        yield store, store
    else:
        async for pair in stores.__wrapped__(request, tmp_path):
            yield pair


async def test_batches_leases_and_results(batch_stores):
    """One runner holds a batch at a time (until its lease lapses); each line's first
    result is kept; a final batch leaves the open list."""
    a, b = batch_stores
    for i, status in enumerate(["in_progress", "completed", "cancelling"]):
        await a.put_batch(pb.Batch(id=f"batch_{i}", owner="t", status=status, created_at=100 + i, total=3))
    assert [x.id for x in await b.batches(open_only=True)] == ["batch_0", "batch_2"]
    assert len(await b.batches()) == 3 and (await b.get_batch("batch_1")).status == "completed"
    assert await b.get_batch("batch_9") is None

    assert await a.claim_batch("batch_0", "g1", 30)
    assert not await b.claim_batch("batch_0", "g2", 30)
    assert await a.claim_batch("batch_0", "g1", 0.2)  # renewed, shorter
    await asyncio.sleep(0.3)
    assert await b.claim_batch("batch_0", "g2", 30)  # lapsed: taken over
    await a.release_batch("batch_0", "g1")  # not g1's any more: no effect
    assert not await a.claim_batch("batch_0", "g1", 30)
    await b.release_batch("batch_0", "g2")
    assert await a.claim_batch("batch_0", "g1", 30)

    first = [pb.BatchResult(index=i, line=b"first %d" % i, failed=i == 2) for i in (0, 2)]
    assert [r.index for r in await a.add_batch_results("batch_0", first)] == [0, 2]
    again = [pb.BatchResult(index=i, line=b"again %d" % i) for i in (1, 2)]
    assert [r.index for r in await b.add_batch_results("batch_0", again)] == [1]
    assert await a.batch_done("batch_0") == [0, 1, 2]
    found = await b.batch_results("batch_0", 1, 3)
    assert [(r.index, r.line, r.failed) for r in found] == [(1, b"again 1", False), (2, b"first 2", True)]
    await a.drop_batch_results("batch_0")
    assert await b.batch_done("batch_0") == []
    assert not await b.batch_cancelled("batch_0")
    await a.cancel_batch("batch_0")
    await a.cancel_batch("batch_0")
    assert await b.batch_cancelled("batch_0") and not await b.batch_cancelled("batch_2")
