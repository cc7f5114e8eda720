"""One contract, two backends: the in-memory scheduler and cache, and the Redis ones
(a real redis-server).  Plus what only a shared backend can do: two coordinators."""

from __future__ import annotations

import asyncio

import pytest

from cyllm import errors
from cyllm.coordinator.cache import CachedResponse
from cyllm.coordinator.main import build_backends
from cyllm.coordinator.queue import Task
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.protocol import pb
from tests.clock import ManualClock
from tests.polling import until

ENTRY = CachedResponse(("Paris",), "stop", 5, 1)


def info(worker_id: str, capacity: int = 1, model: str = "m", weight: int = 1) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id,
        address=f"{worker_id}:1",
        capacity=capacity,
        models=[pb.ModelInfo(id=model, context_length=100)],
        weight=weight,
    )


@pytest.fixture(params=["memory", "redis"])
async def make(request):
    """``make(name, **settings)``: a scheduler and cache; ``make.advance(s)``: ``s``
    seconds pass for them (a manual clock in memory; Redis keeps its own)."""
    made = []
    clock = ManualClock(1000.0)

    async def factory(name: str = "c1", **kw):
        url = request.getfixturevalue("redis_url") if request.param == "redis" else None
        settings = CoordinatorSettings(redis_url=url, **{"queue_timeout_s": 5, **kw})
        backends = build_backends(settings, name, clock)
        await backends.start()
        made.append(backends)
        return backends.scheduler, backends.cache

    async def advance(seconds: float) -> None:
        if request.param == "memory":
            clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    factory.backend = request.param
    factory.advance = advance
    yield factory
    for s in made:
        await s.close()


async def test_registered_worker_is_listed_healthy_and_unknown_heartbeat_is_refused(make):
    s, _ = await make()
    await s.register(info("w1"))
    (view,) = await s.workers()
    assert view.healthy and view.record.info.address == "w1:1"
    assert [m.id for m in await s.models()] == ["m"]
    assert await s.heartbeat("w1", 0, 0) is True
    assert await s.heartbeat("ghost", 0, 0) is False
    await s.deregister("w1")
    assert await s.workers() == []


async def test_unknown_model_and_all_unhealthy_are_told_apart(make):
    s, _ = await make(heartbeat_timeout_s=0.2)
    await s.register(info("w1"))
    with pytest.raises(errors.ModelNotFound, match="does not exist"):
        await s.check_model("other")
    await make.advance(0.4)
    with pytest.raises(errors.Unavailable, match="no heartbeat"):
        await s.check_model("m")


async def test_a_slot_is_held_until_released(make):
    s, _ = await make()
    await s.register(info("w1", capacity=1))
    first = Task("t1", "m")
    assert (await s.acquire(first)).worker_id == "w1"
    second = asyncio.create_task(s.acquire(Task("t2", "m")))
    await until(s.queue_depth, lambda d: d == 1, what="the second task queued")
    assert not second.done()
    await s.release(first, "w1")
    assert (await asyncio.wait_for(second, 3)).worker_id == "w1"
    assert await s.queue_depth() == 0


async def test_a_release_can_keep_the_answer_in_the_cache(make):
    """A finished answer is stored as its slot is freed (on Redis in the release's own
    round trip), also after Redis lost its scripts."""
    from cyllm.coordinator.scheduler import Keep

    s, cache = await make()
    await s.register(info("w1", capacity=1))
    for n in range(2):
        task = Task(f"t{n}", "m")
        await s.acquire(task)
        if n and make.backend == "redis":
            await cache.redis.script_flush()  # as after a Redis restart
        await s.release(task, "w1", Keep(cache, f"k{n}", ENTRY))
        assert await cache.get(f"k{n}") == ENTRY
        (view,) = await s.workers()
        assert view.record.outstanding == 0  # released once, not twice
    second = asyncio.create_task(s.acquire(Task("t9", "m")))
    assert (await asyncio.wait_for(second, 3)).worker_id == "w1"


async def test_higher_priority_gets_the_next_slot(make):
    s, _ = await make()
    await s.register(info("w1", capacity=1))
    busy = Task("busy", "m")
    await s.acquire(busy)
    order: list[str] = []

    async def wait(task: Task) -> None:
        await s.acquire(task)
        order.append(task.task_id)
        await s.release(task, "w1")

    low = asyncio.create_task(wait(Task("low", "m", priority=0)))
    await until(s.queue_depth, lambda d: d == 1, what="low queued")
    high = asyncio.create_task(wait(Task("high", "m", priority=5)))
    await until(s.queue_depth, lambda d: d == 2, what="high queued after low")
    await s.release(busy, "w1")
    await asyncio.wait_for(asyncio.gather(low, high), 5)
    assert order == ["high", "low"]


async def test_full_queue_refuses_and_keeps_what_it_has(make):
    s, _ = await make(queue_max_size=1, retry_after_s=4)
    await s.register(info("w1", capacity=1))
    await s.acquire(Task("running", "m"))
    waiting = asyncio.create_task(s.acquire(Task("waiting", "m")))
    await until(s.queue_depth, lambda d: d == 1, what="a task queued")
    with pytest.raises(errors.Overloaded) as refused:
        await s.acquire(Task("refused", "m"))
    assert refused.value.retry_after == 4
    assert await s.queue_depth() == 1
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert await s.queue_depth() == 0  # a caller who gives up leaves the queue


async def test_silent_worker_and_hung_worker_become_unhealthy(make):
    s, _ = await make(heartbeat_timeout_s=0.5, progress_timeout_s=0.5)
    await s.register(info("silent"))
    await s.register(info("hung"))
    for _ in range(4):  # "hung" keeps beating with work in flight and no new token
        await s.heartbeat("hung", 1, 7)
        await make.advance(0.2)
    views = {v.record.worker_id: v for v in await s.workers()}
    assert "no heartbeat" in views["silent"].unhealthy_reason
    assert "no token" in views["hung"].unhealthy_reason
    await s.heartbeat("hung", 1, 8)  # progress again: healthy
    assert {v.record.worker_id: v.healthy for v in await s.workers()}["hung"] is True


async def test_excluded_and_full_workers_are_skipped(make):
    s, _ = await make()
    await s.register(info("a", capacity=1))
    await s.register(info("b", capacity=1))
    got = await s.acquire(Task("t1", "m"), exclude={"a"})
    assert got.worker_id == "b"
    got = await s.acquire(Task("t2", "m"))
    assert got.worker_id == "a"


async def test_weighted_round_robin_follows_the_weights(make):
    s, _ = await make(routing="weighted_round_robin")
    await s.register(info("heavy", capacity=100, weight=3))
    await s.register(info("light", capacity=100, weight=1))
    picks = [(await s.acquire(Task(f"t{i}", "m"))).worker_id for i in range(8)]
    assert picks.count("heavy") == 6 and picks.count("light") == 2


async def test_prefix_affinity_sends_a_conversation_to_one_worker(make):
    s, _ = await make(routing="prefix_affinity")
    for w in ("a", "b", "c"):
        await s.register(info(w, capacity=100))
    first = [(await s.acquire(Task(f"x{i}", "m", affinity="conv-1"))).worker_id for i in range(5)]
    assert len(set(first)) == 1


async def test_cache_contract(make):
    _, cache = await make(cache_ttl_s=0.5, cache_max_entries=2)
    assert await cache.get("k") is None
    await cache.put("k", ENTRY)
    assert await cache.get("k") == ENTRY
    await cache.put("k2", ENTRY)
    await cache.get("k")
    await cache.put("k3", ENTRY)  # k2 is the least recently used
    assert await cache.get("k2") is None
    assert await cache.size() == 2
    await make.advance(0.6)
    assert await cache.get("k") is None
    assert (await cache.hits(), await cache.misses()) == (2, 3)


# -- only a shared backend ---------------------------------------------------------------


@pytest.fixture
def shared(make):
    if make.backend != "redis":
        pytest.skip("two coordinators share state only through Redis")
    return make


async def test_two_coordinators_share_workers_slots_and_queue(shared):
    a, _ = await shared("a")
    b, _ = await shared("b")
    await a.register(info("w1", capacity=2))
    assert [v.record.worker_id for v in await b.workers()] == ["w1"]
    await a.acquire(Task("t1", "m"))
    await b.acquire(Task("t2", "m"))
    third = asyncio.create_task(b.acquire(Task("t3", "m")))
    await until(a.queue_depth, lambda d: d == 1, what="one queue, one capacity")
    assert not third.done()
    await a.release(Task("t1", "m"), "w1")
    assert (await asyncio.wait_for(third, 3)).worker_id == "w1"


async def test_no_task_is_taken_twice_under_contention(shared):
    a, _ = await shared("a")
    b, _ = await shared("b")
    await a.register(info("w1", capacity=3))
    await a.register(info("w2", capacity=3))
    live = {"n": 0, "max": 0}
    taken: list[str] = []

    async def run(s, i: int) -> None:
        task = Task(f"t{i}", "m")
        w = await s.acquire(task)
        live["n"] += 1
        live["max"] = max(live["max"], live["n"])
        taken.append(task.task_id)
        await asyncio.sleep(0.02)
        live["n"] -= 1
        await s.release(task, w.worker_id)

    await asyncio.wait_for(asyncio.gather(*(run(a if i % 2 else b, i) for i in range(40))), 30)
    assert sorted(taken) == sorted(f"t{i}" for i in range(40))
    assert live["max"] <= 6
    assert sum(v.record.outstanding for v in await a.workers()) == 0


async def test_a_task_whose_coordinator_died_returns_to_the_queue(shared):
    a, _ = await shared("a", lease_s=0.6)
    b, _ = await shared("b", lease_s=0.6)
    await a.register(info("w1", capacity=1))
    await a.acquire(Task("orphan", "m"))
    for t in a._tasks:  # a dies: no renewal, no release
        t.cancel()
    # the lease expires; b's housekeeping puts it back, the slot freed
    await until(
        b.workers, lambda ws: ws[0].record.outstanding == 0, timeout=5, what="the orphan's slot freed"
    )
    # The gateway retries the request on b: b adopts it and it gets the slot.
    assert (await asyncio.wait_for(b.acquire(Task("orphan", "m")), 3)).worker_id == "w1"


@pytest.mark.parametrize(
    "old_tokens, tokens, running", [(5, 5, 2), (5, 6, 2), (5, 5, 0), (5, 6, 0), (0, 0, 1), (7, 3, 1)]
)
async def test_the_progress_rule_is_the_same_in_python_and_in_lua(redis_url, old_tokens, tokens, running):
    # The Redis heartbeat applies pool.progressed inside its Lua script; both must agree.
    from cyllm.coordinator.pool import progressed
    from cyllm.coordinator.redis_backend import P

    s = build_backends(CoordinatorSettings(redis_url=redis_url), "c1").scheduler
    await s.start()
    try:
        await s.register(info("w1"))
        await s.r.hset(P + "w:w1", mapping={"tokens": old_tokens, "running": 1, "progress": 0})
        await s.heartbeat("w1", running, tokens)
        moved = int(await s.r.hget(P + "w:w1", "progress")) > 0
    finally:
        await s.close()
    assert moved is progressed(old_tokens, tokens, running)


async def test_a_waiting_task_nobody_waits_for_is_dropped_by_another_coordinator(shared):
    """The task at the head belongs to a coordinator that died (a restarted one under
    the same id would not know it either): once its mark lapses, any coordinator drops
    it, and the tasks behind it are served."""
    a, _ = await shared("a")
    b, _ = await shared("b")
    for s in (a, b):
        s.wait_ms = 600
    await a.register(info("w1", capacity=1))
    held = await a.acquire(Task("running", "m"))  # the one slot is taken
    dead = asyncio.create_task(a.acquire(Task("dead-waiter", "m")))
    await until(a.queue_depth, lambda d: d == 1, what="the dead waiter queued")
    for t in a._tasks:  # a dies: its marks are no longer refreshed, its dispatch stops
        t.cancel()
    behind = asyncio.create_task(b.acquire(Task("behind", "m")))
    await until(b.queue_depth, lambda d: d == 2, what="a task queued behind it")
    await b.release(Task("running", "m"), held.worker_id)
    try:
        assert (await asyncio.wait_for(behind, 5)).worker_id == "w1"
        assert not dead.done()  # its (dead) caller never got the slot
    finally:
        dead.cancel()
