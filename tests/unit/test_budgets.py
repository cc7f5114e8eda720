"""Budgets' counters without Redis: what a period has spent is never forgotten by a
request that was waiting for the ledger's sum while others spent."""

from __future__ import annotations

import asyncio

import pytest

from cyllm.gateway.budgets import Budget, Budgets, QuotaExceeded, period_bounds


async def test_a_counter_seeded_while_others_spend_keeps_their_spending():
    gates = [asyncio.Event(), asyncio.Event()]
    calls = iter(gates)

    async def seed(subject: str, since: int) -> tuple[int, float]:
        await next(calls).wait()  # the ledger's answer, when the test says
        return 0, 0.0

    budgets = Budgets(None, seed)
    budget = Budget(tokens_per_day=100)
    first = asyncio.create_task(budgets.reserve("key:a", budget, 10, {}))
    second = asyncio.create_task(budgets.reserve("key:a", budget, 10, {}))
    await asyncio.sleep(0)  # both wait for the ledger
    gates[0].set()
    await budgets.release(await first, 60)  # the first ends having used 60
    gates[1].set()  # the second's (stale) sum arrives after that
    await second
    with pytest.raises(QuotaExceeded, match="100 tokens per day"):
        await budgets.reserve("key:a", budget, 50, {})  # 60 spent + 10 running + 50 > 100


def test_periods_are_utc_days_and_months():
    t = 1_796_342_400 + 3600  # 2026-12-04T01:00:00Z
    assert period_bounds("day", t) == (1_796_342_400, 1_796_342_400 + 86400)
    assert period_bounds("month", t) == (1_796_083_200, 1_798_761_600)  # 2026-12-01 to 2027-01-01
