"""Budgets' and the tokens-per-minute limit's counters under concurrency: what was spent
is never forgotten by a request admitted meanwhile, on this gateway or another."""

from __future__ import annotations

import asyncio
import time

import pytest

from cyllm import errors
from cyllm.gateway.auth import Identity
from cyllm.gateway.budgets import Budget, Budgets, Hold, QuotaExceeded, period_bounds
from cyllm.gateway.counters import Counters
from cyllm.gateway.ratelimit import RateLimiter
from cyllm.gateway.settings import GatewaySettings
from cyllm.shared_state import POOL_SIZE


async def reserve(budgets: Budgets, subject: str, budget: Budget, tokens: int) -> Hold:
    hold = Hold(subject, {})
    await budgets.reserve(hold, budget, tokens, {})
    return hold


async def test_a_counter_seeded_while_others_spend_keeps_their_spending():
    gates = [asyncio.Event(), asyncio.Event()]
    calls = iter(gates)

    async def seed(subject: str, since: int) -> tuple[int, float]:
        await next(calls).wait()  # the ledger's answer, when the test says
        return 0, 0.0

    budgets = Budgets(Counters(None), seed)
    budget = Budget(tokens_per_day=100)
    first = asyncio.create_task(reserve(budgets, "key:a", budget, 10))
    second = asyncio.create_task(reserve(budgets, "key:a", budget, 10))
    await asyncio.sleep(0)  # both wait for the ledger
    gates[0].set()
    await budgets.release(await first, 60)  # the first ends having used 60
    gates[1].set()  # the second's (stale) sum arrives after that
    await second
    with pytest.raises(QuotaExceeded, match="100 tokens per day"):
        await reserve(budgets, "key:a", budget, 50)  # 60 spent + 10 running + 50 > 100


def test_periods_are_utc_days_and_months():
    t = 1_796_342_400 + 3600  # 2026-12-04T01:00:00Z
    assert period_bounds("day", t) == (1_796_342_400, 1_796_342_400 + 86400)
    assert period_bounds("month", t) == (1_796_083_200, 1_798_761_600)  # 2026-12-01 to 2027-01-01


async def test_a_request_ending_on_another_gateway_while_one_is_admitted_is_counted(redis_url):
    """Gateway B's request ends (its reservation becomes spending) while gateway A admits
    one: A sees it as reserved or as spent, never as neither (read apart, the counters
    let A in: 91 tokens of a budget of 60 in CI, with 16 requests on two gateways)."""

    async def seed(subject: str, since: int) -> tuple[int, float]:
        return 0, 0.0

    on_a, on_b = Counters(redis_url), Counters(redis_url)
    a, b = Budgets(on_a, seed), Budgets(on_b, seed)
    budget = Budget(tokens_per_day=10)
    running_on_b = await reserve(b, "key:shared", budget, 8)
    command = on_a.redis.execute_command

    async def then_b_ends(*args, **kwargs):  # after A's first command to Redis
        reply = await command(*args, **kwargs)
        if running_on_b.reserved:
            await b.release(running_on_b, 8)
        return reply

    on_a.redis.execute_command = then_b_ends
    with pytest.raises(QuotaExceeded):  # 8 spent + 8 reserved > 10
        await reserve(a, "key:shared", budget, 8)
    assert not running_on_b.reserved
    await on_a.close()
    await on_b.close()


async def test_a_burst_of_more_requests_than_redis_connections_waits_for_them(redis_url):
    """More budgeted requests at once than a gateway's connections to Redis: they queue
    for a connection, none fails (redis-py's default pool raised past 100)."""

    async def seed(subject: str, since: int) -> tuple[int, float]:
        return 0, 0.0

    counters = Counters(redis_url)
    budgets = Budgets(counters, seed)
    budget = Budget(tokens_per_day=10_000)
    holds = await asyncio.gather(*(reserve(budgets, "key:burst", budget, 8) for _ in range(3 * POOL_SIZE)))
    await asyncio.gather(*(budgets.release(h, 7) for h in holds))
    spent, held = await budgets._reserve(Hold("key:burst", {}), "day", *period_bounds("day", time.time()), 0)
    assert (spent, held) == (7 * 3 * POOL_SIZE, 0)
    await counters.close()


async def test_a_request_ending_on_another_gateway_while_one_is_admitted_counts_against_tpm(redis_url):
    """The tokens-per-minute limit on two gateways, as the budget above: a request that
    ends on B while A admits one is in B's reservation or in the window when A reads
    them, never in neither (A read the window, then reserved: in neither)."""
    settings = GatewaySettings(redis_url=redis_url, rate_limit_tpm=20)

    async def seed(subject: str, since: int) -> tuple[int, float]:
        return 0, 0.0

    a, b = RateLimiter(settings, seed), RateLimiter(settings, seed)
    caller = Identity("key:shared", "api_key")
    running_on_b = await b.admit(caller, 12)
    read, hold = a.window.get_window_stats, a.counters.hold

    async def then_b_ends(step, *args):  # after A's first step, whichever it is
        reply = await step(*args)
        if running_on_b.reserved:
            await b.finish(running_on_b, 12)
        return reply

    a.window.get_window_stats = lambda *args: then_b_ends(read, *args)
    a.counters.hold = lambda *args: then_b_ends(hold, *args)
    with pytest.raises(errors.RateLimited, match="tokens per minute"):  # 12 counted + 12 reserved > 20
        await a.admit(caller, 12)
    assert not running_on_b.reserved
    await a.close()
    await b.close()


async def test_a_spending_counter_lost_mid_request_starts_again_from_the_ledger(redis_url):
    """The spent counter evicted or flushed while a request runs: its settlement does not
    create it with the request's tokens alone (the period's spending before would be
    forgotten); the next request seeds it from the ledger, which has them all."""
    ledger = {"tokens": 0}

    async def seed(subject: str, since: int) -> tuple[int, float]:
        return ledger["tokens"], 0.0

    counters = Counters(redis_url)
    budgets = Budgets(counters, seed)
    budget = Budget(tokens_per_day=100)
    running = await reserve(budgets, "key:a", budget, 10)
    await counters.redis.delete(*await counters.redis.keys("cyllm:budget:spent:*"))
    await budgets.release(running, 5)
    assert not await counters.redis.keys("cyllm:budget:spent:*")
    ledger["tokens"] = 95  # what the gateways reported before, and this request's 5
    with pytest.raises(QuotaExceeded):  # 95 spent + 10 > 100
        await reserve(budgets, "key:a", budget, 10)
    await counters.close()
