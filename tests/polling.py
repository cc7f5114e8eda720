"""Waiting for a state to be reached, the one way the suite does it: look, and look again
every ``every`` seconds until ``timeout``; fail naming what was awaited and what was
last seen.  A test waits on a state (a queue depth, a worker registered, a job done),
never on a sleep it hopes is long enough.  ``until`` for async tests, ``wait_for`` for
tests that drive real processes from plain code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _failure(what: str, last: Any, describe: Callable[[], str] | None) -> AssertionError:
    extra = f"\n{describe()}" if describe is not None else ""
    return AssertionError(f"timed out waiting for {what} (last seen: {last!r}){extra}")


async def until(
    get: Callable[[], Awaitable[T]],
    predicate: Callable[[T], Any] = bool,
    *,
    timeout: float = 30.0,
    every: float = 0.05,
    what: str = "the condition",
) -> T:
    """``await get()`` until ``predicate`` holds for what it returns; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise _failure(what, value, None)
        await asyncio.sleep(every)


def wait_for(
    get: Callable[[], T],
    predicate: Callable[[T], Any] = bool,
    *,
    timeout: float = 30.0,
    every: float = 0.1,
    what: str = "the condition",
    describe: Callable[[], str] | None = None,
) -> T:
    """``get()`` until ``predicate`` holds for what it returns; that value.
    ``describe``: more to say on a failure (the processes' logs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise _failure(what, value, describe)
        time.sleep(every)


async def returns(value: T) -> T:
    """``value`` as an awaitable: ``until(lambda: returns(x.attr), ...)`` watches a plain
    attribute."""
    return value
