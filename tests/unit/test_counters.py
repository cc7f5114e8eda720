"""What running requests hold, across gateways on one Redis (``cyllm/gateway/counters.py``):
a dead gateway's holds let go, a live one's kept whatever became of Redis; a hold or
let-go sent twice counted once; a request's end never lost to its cancellation or to
a Redis away."""

from __future__ import annotations

import asyncio

import anyio
import redis.exceptions

from cyllm.gateway import counters as counters_module
from cyllm.gateway.auth import Identity
from cyllm.gateway.budgets import Budget
from cyllm.gateway.counters import LIVE, Counters
from cyllm.gateway.ratelimit import RateLimiter
from cyllm.gateway.settings import GatewaySettings

KEY = "cyllm:limits:running:key:victim"


async def total(counters: Counters) -> int:
    return (await counters.read(KEY, ("cyllm:none", 0, 0)))[0]


async def test_what_a_dead_gateway_held_is_let_go_and_a_live_ones_kept(redis_url):
    """A gateway killed mid-request never lets go: once its last mark is older than
    ``DEAD_AFTER_S`` the others count its holds no more (a plain counter kept them while
    the caller's traffic refreshed its expiry: a caller locked out of its generation
    slots for good); a live gateway's holds are counted."""
    dead, live, other = Counters(redis_url), Counters(redis_url), Counters(redis_url)
    assert await dead.hold(KEY, "d1", 3) == (3, None)
    assert await live.hold(KEY, "l1", 2) == (5, None)
    dead._marks.cancel()  # killed: no more marks, no let-go
    await dead.redis.zadd(LIVE, {dead.me: 0})  # its last mark, long ago
    assert await other.hold(KEY, "o1", 1) == (3, None)  # the live gateway's 2 and its own 1
    await live.let_go(KEY, "l1")
    await other.let_go(KEY, "o1")
    assert await total(other) == 0
    for c in (dead, live, other):
        await c.close()


async def test_a_live_gateways_holds_are_counted_after_redis_was_flushed(redis_url):
    """Redis emptied (flushed, or restarted without its data): the marks are gone with
    the holds, and a gateway that holds again is alive at once, not at its next mark."""
    one, two = Counters(redis_url), Counters(redis_url)
    await one.hold(KEY, "a", 1)
    await one.redis.flushdb()
    assert await one.hold(KEY, "b", 1) == (1, None)
    assert await two.hold(KEY, "c", 1) == (2, None)
    await one.close()
    await two.close()


async def test_a_hold_or_let_go_sent_twice_counts_once(redis_url):
    """redis-py sends a command again after a timeout, though Redis may have run the first
    (a stall past socket_timeout), and a let-go is tried again after Redis was away: the
    second changes nothing — the slot is held once, the tokens spent once."""
    one = Counters(redis_url)
    spent = ("cyllm:budget:spent:test", 5, 2**31)
    await one.redis.set(spent[0], 10)
    for _ in range(2):
        assert (await one._run(KEY, "e1", "hold", 1, None))[0] == 1
    for _ in range(2):
        await one._run(KEY, "e1", "let_go", 0, spent)
    assert await total(one) == 0 and int(await one.redis.get(spent[0])) == 15
    await one.let_go(KEY, "never-held", spent)  # a hold that never landed: harmless
    assert int(await one.redis.get(spent[0])) == 15
    await one.close()


async def test_a_hold_cancelled_in_flight_lands_before_its_let_go(redis_url):
    """The request is cancelled (asyncio's own task.cancel: a hang-up watcher, a batch
    stopping) while its hold is on the way to Redis: the hold still lands, and the
    let-go that follows waits for it, so nothing stays held.  A hold that reaches Redis
    after its let-go all the same (stalled on a connection that died) does not land."""
    one = Counters(redis_url)
    script, on_its_way = one._change, asyncio.Event()

    async def slow(*args, keys, **kwargs):
        if "e1" in keys[2]:
            await on_its_way.wait()
        return await script(*args, keys=keys, **kwargs)

    one._change = slow
    holding = asyncio.create_task(one.hold(KEY, "e1", 1))
    await asyncio.sleep(0.05)
    holding.cancel()
    await asyncio.gather(holding, return_exceptions=True)
    assert holding.cancelled()
    letting_go = asyncio.create_task(one.let_go(KEY, "e1"))
    await asyncio.sleep(0.05)
    assert not letting_go.done()  # it waits for the hold
    on_its_way.set()
    await letting_go
    assert await total(one) == 0
    await one._run(KEY, "e2", "let_go", 0, None)
    await one._run(KEY, "e2", "hold", 1, None)  # late: the let-go's tombstone keeps it out
    assert await total(one) == 0
    await one.close()


async def test_a_request_cancelled_as_it_ends_still_lets_go_and_is_counted(redis_url):
    """A client gone mid-stream cancels the request, its end included (Starlette's
    streaming response: an anyio cancel scope; a hang-up watcher: task.cancel): its slot,
    its reserved tokens and its budget's hold are let go all the same, and what it used
    is spent."""
    settings = GatewaySettings(redis_url=redis_url, rate_limit_tpm=1000, rate_limit_concurrency=1)

    async def seed(subject: str, since: int) -> tuple[int, float]:
        return 0, 0.0

    limiter = RateLimiter(settings, seed)
    caller = Identity("key:gone", "api_key", budget=Budget(tokens_per_day=100))
    for _ in range(2):
        adm = await limiter.admit(caller, 30)
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before and during its end
            await limiter.finish(adm, 20)
    adm = await limiter.admit(caller, 30)
    ending = asyncio.create_task(limiter.finish(adm, 20))
    await asyncio.sleep(0)
    ending.cancel()
    await asyncio.gather(ending, return_exceptions=True)
    await asyncio.wait(list(limiter._ending))  # what the cancelled end still does
    adm = await limiter.admit(caller, 30)  # one slot, free again; 60 spent + 30 <= 100
    assert "90%" in adm.headers["x-cyllm-budget-warning"]
    await limiter.finish(adm, 0)
    await limiter.close()


async def test_a_let_go_that_redis_refuses_is_kept_and_tried_again(redis_url, monkeypatch):
    monkeypatch.setattr(counters_module, "ALIVE_EVERY_S", 0.05)
    one, two = Counters(redis_url), Counters(redis_url)
    await one.hold(KEY, "e1", 2)
    script = one._change
    calls = 0

    async def away(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise redis.exceptions.ConnectionError("Redis is away")
        return await script(*args, **kwargs)

    one._change = away
    await one.let_go(KEY, "e1")  # refused: kept, not raised
    assert calls == 1 and await total(two) == 2
    for _ in range(100):  # the next marks pay it
        if await total(two) == 0:
            break
        await asyncio.sleep(0.05)
    assert await total(two) == 0 and not one._owed
    await one.close()
    await two.close()


async def test_the_marks_go_on_after_redis_refuses_one_and_stop_at_close(redis_url, monkeypatch):
    """A mark that fails with any error (out of memory, read-only replica), not only a
    lost connection, does not end the marks; closing ends them for good."""
    monkeypatch.setattr(counters_module, "ALIVE_EVERY_S", 0.05)
    one = Counters(redis_url)
    mark = one._alive
    failed = 0

    async def refused_once(*args, **kwargs):
        nonlocal failed
        if not failed:
            failed = 1
            raise redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'")
        return await mark(*args, **kwargs)

    one._alive = refused_once
    await one.hold(KEY, "e1", 1)
    await one.redis.zadd(LIVE, {one.me: 0})
    for _ in range(100):
        if (await one.redis.zscore(LIVE, one.me) or 0) > 0:
            break
        await asyncio.sleep(0.05)
    assert failed and (await one.redis.zscore(LIVE, one.me) or 0) > 0 and not one._marks.done()
    await one.let_go(KEY, "e1")
    watcher = Counters(redis_url)
    await one.close()
    await asyncio.sleep(0.2)  # marks, were they still going
    assert one._marks.done() and await watcher.redis.zscore(LIVE, one.me) is None
    await watcher.close()


async def test_a_counter_adds_up_gateways_not_requests(redis_url):
    """A hold reads one subtotal per gateway, however many requests run: its cost does not
    grow with a caller's concurrency (one field per request cost Redis 2 ms a call at
    5,000, and a burst of holds blocked it for seconds)."""
    one, two = Counters(redis_url), Counters(redis_url)
    await asyncio.gather(*(one.hold(KEY, f"a{i}", 1) for i in range(300)))
    assert await two.hold(KEY, "b", 2) == (302, None)
    assert await one.redis.hlen(KEY) == 2  # the subtotals: one per gateway
    await asyncio.gather(*(one.let_go(KEY, f"a{i}") for i in range(300)))
    assert await total(two) == 2
    await one.close()
    await two.close()


async def test_what_expired_entries_held_goes_with_them_and_a_zero_hold_lets_go(redis_url):
    """This gateway's entries gone (expired, or a let-go never paid) while the others
    kept the subtotals alive: what they held is no longer counted.  A hold of nothing
    is let go like any other, its tokens spent."""
    one, two = Counters(redis_url), Counters(redis_url)
    await one.hold(KEY, "lost", 1)
    await one.redis.delete(f"{KEY}:entries:{one.me}")
    assert await two.hold(KEY, "b", 1) == (2, None)  # still there until this gateway calls
    assert await one.hold(KEY, "c", 1) == (2, None)  # its lost entry's hold is gone
    spent = ("cyllm:budget:spent:zero", 4, 2**31)
    await one.redis.set(spent[0], 0)
    await one.hold(KEY, "zero", 0)
    await one.let_go(KEY, "zero", spent)
    assert int(await one.redis.get(spent[0])) == 4 and not one._owed
    await one.close()
    await two.close()
