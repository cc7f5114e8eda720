"""The grammar guard's turns: one compile at a time, the tenants taking turns, so one
tenant's queue of slow schemas delays another's by one turn at most."""

from __future__ import annotations

import asyncio

from cyllm.worker.engines.grammar_guard import FairTurns


async def test_another_tenant_waits_for_one_turn_not_the_whole_queue():
    turns, order = FairTurns(), []
    release = {name: asyncio.Event() for name in ("a1", "a2", "a3", "b1")}

    async def take(tenant: str, name: str) -> None:
        async with turns.turn(tenant):
            order.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(take("a", "a1"))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(take("a", n)) for n in ("a2", "a3")]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(take("b", "b1")))  # came last, served second
    for name in ("a1", "b1", "a2", "a3"):
        await asyncio.sleep(0)
        release[name].set()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "a2", "a3"]


async def test_a_waiter_that_leaves_gives_up_its_place_and_a_turn_is_never_lost():
    turns, order = FairTurns(), []
    hold = asyncio.Event()

    async def take(tenant: str, name: str, wait: asyncio.Event | None = None) -> None:
        async with turns.turn(tenant):
            order.append(name)
            if wait is not None:
                await wait.wait()

    first = asyncio.create_task(take("a", "a1", hold))
    await asyncio.sleep(0)
    leaving = asyncio.create_task(take("b", "b1"))
    staying = asyncio.create_task(take("c", "c1"))
    await asyncio.sleep(0)
    leaving.cancel()
    hold.set()
    await asyncio.gather(first, staying)
    assert order == ["a1", "c1"]
    async with turns.turn("d"):  # free again: taken at once
        order.append("d1")
    assert order[-1] == "d1"
