"""What running requests hold, across gateways on one Redis (``cyllm/gateway/counters.py``):
a dead gateway's holds let go, a live one's kept whatever became of Redis, a let-go
never lost to a cancelled request or a Redis away, a spending counter never created by
a settlement."""

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


async def test_what_a_dead_gateway_held_is_let_go_and_a_live_ones_kept(redis_url):
    """A gateway killed mid-request never lets go of its holds: once its last mark is
    older than ``DEAD_AFTER_S`` the others count them no more (a plain counter kept
    them while the caller's traffic refreshed its expiry: a caller locked out of its
    generation slots for good); a live gateway's holds are counted."""
    dead, live, other = Counters(redis_url), Counters(redis_url), Counters(redis_url)
    key = "cyllm:limits:running:key:victim"
    assert await dead.hold(key, 3) == (3, None)
    assert await live.hold(key, 2) == (5, None)
    dead._task.cancel()  # killed: no more marks, no let-go
    await dead.redis.zadd(LIVE, {dead.me: 0})  # its last mark, long ago
    assert await other.hold(key, 1) == (3, None)  # the live gateway's 2 and its own 1
    await live.let_go(key, 2)
    assert await other.hold(key, -1) == (0, None)
    assert not await other.redis.exists(key) or not await other.redis.hgetall(key)
    for c in (dead, live, other):
        await c.close()


async def test_a_live_gateways_holds_are_counted_after_redis_was_flushed(redis_url):
    """Redis emptied (flushed, or restarted without its data): the marks are gone with
    the holds, and a gateway that holds again is alive at once, not at its next mark."""
    one, two = Counters(redis_url), Counters(redis_url)
    await one.hold(KEY, 1)
    await one.redis.flushdb()
    assert await one.hold(KEY, 1) == (1, None)
    assert await two.hold(KEY, 1) == (2, None)
    await one.close()
    await two.close()


async def test_a_request_cancelled_as_it_ends_still_lets_go_and_is_counted(redis_url):
    """A client gone mid-stream cancels the request, its end included (Starlette's
    streaming response: an anyio cancel scope): its slot, its reserved tokens and its
    budget's hold are let go all the same, and what it used is spent."""
    settings = GatewaySettings(redis_url=redis_url, rate_limit_tpm=1000, rate_limit_concurrency=1)

    async def seed(subject: str, since: int) -> tuple[int, float]:
        return 0, 0.0

    limiter = RateLimiter(settings, seed)
    caller = Identity("key:gone", "api_key", budget=Budget(tokens_per_day=100))
    for _ in range(3):
        adm = await limiter.admit(caller, 30)
        with anyio.CancelScope() as scope:
            scope.cancel()  # cancelled before and during its end
            await limiter.finish(adm, 20)
    adm = await limiter.admit(caller, 30)  # one slot, free again; 60 spent + 30 <= 100
    assert "x-cyllm-budget-warning" in adm.headers and "90%" in adm.headers["x-cyllm-budget-warning"]
    await limiter.finish(adm, 0)
    await limiter.close()


async def test_a_let_go_that_redis_refuses_is_kept_and_tried_again(redis_url, monkeypatch):
    monkeypatch.setattr(counters_module, "ALIVE_EVERY_S", 0.05)
    one, two = Counters(redis_url), Counters(redis_url)
    await one.hold(KEY, 2)
    script = one._hold
    calls = 0

    async def away(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise redis.exceptions.ConnectionError("Redis is away")
        return await script(*args, **kwargs)

    one._hold = away
    await one.let_go(KEY, 2)  # refused: kept, not raised
    assert calls == 1 and (await two.hold(KEY, 0))[0] == 2
    for _ in range(100):  # the next marks pay it
        if (await two.hold(KEY, 0))[0] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await two.hold(KEY, 0))[0] == 0 and not one._owed
    await one.close()
    await two.close()


async def test_the_marks_go_on_after_redis_refuses_one(redis_url, monkeypatch):
    """A mark that fails with any error (out of memory, read-only replica), not only a
    lost connection, does not end the marks: the gateway stays alive to the others."""
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
    await one.hold(KEY, 1)
    await one.redis.zadd(LIVE, {one.me: 0})
    for _ in range(100):
        if (await one.redis.zscore(LIVE, one.me) or 0) > 0:
            break
        await asyncio.sleep(0.05)
    assert failed and (await one.redis.zscore(LIVE, one.me) or 0) > 0 and not one._task.done()
    await one.close()
