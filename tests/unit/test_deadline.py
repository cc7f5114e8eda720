"""``Deadline`` bounds each wait as ``asyncio.timeout`` would, with one timer."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from cyllm.protocol.deadline import Deadline, Expired


async def ticks(every: float, log: list[str]):
    try:
        i = 0
        while True:
            await asyncio.sleep(every)
            yield i
            i += 1
    finally:
        log.append("closed")


async def test_a_wait_past_the_limit_ends_where_it_waits():
    log: list[str] = []
    source = ticks(1.0, log)
    deadline = Deadline(asyncio.get_running_loop().time() + 0.05)
    with pytest.raises(Expired):
        await deadline.wait(anext(source))
    deadline.close()
    await source.aclose()
    assert log == ["closed"]
    assert asyncio.current_task().cancelling() == 0  # the cancellation was taken back


async def test_a_sliding_limit_counts_only_the_time_spent_waiting():
    source, deadline = ticks(0.03, []), Deadline()
    got = []
    for _ in range(6):  # 6 waits of 30 ms under a 100 ms limit, with 150 ms away in between
        got.append(await deadline.wait(anext(source), within=0.1))
        await asyncio.sleep(0.15)
    deadline.close()
    assert got == list(range(6))
    with pytest.raises(Expired):  # and a silence longer than the limit is one
        await deadline.wait(anext(ticks(1.0, [])), within=0.05)


async def test_a_limit_already_past_raises_without_starting_the_wait():
    deadline = Deadline(asyncio.get_running_loop().time() - 1)

    async def never() -> None:
        raise AssertionError("awaited")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Expired):
            await deadline.wait(never())


async def test_someone_elses_cancellation_stays_a_cancellation():
    deadline = Deadline(asyncio.get_running_loop().time() + 10)
    waiting = asyncio.create_task(deadline.wait(asyncio.sleep(5)))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    deadline.close()


async def test_no_limit_waits_as_long_as_it_takes():
    deadline = Deadline()
    assert await deadline.wait(asyncio.sleep(0.05, result="done")) == "done"
