"""A time limit on a task's waits for the next message of a stream, with one timer.

An in-process call's deadline (``local.py``) and the coordinator's rule that a silent
worker is given up on (``_paced``) bound every wait for a message.  ``asyncio.timeout``
around each wait builds a context, looks up the task and schedules and cancels a timer
handle per message: about 3% of the gateway's CPU for a short request, whose three
messages pass both.  :class:`Deadline` keeps one timer per stream and moves the
limit with a float; the timer, when it fires early, sets itself again for the limit as
it is then.  What a waiter sees is what ``asyncio.timeout`` gives: the wait is
cancelled where it is (a generator being read ends there), and :class:`Expired` comes
out instead of the cancellation; a cancellation from anyone else stays one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Expired(Exception):
    """The limit passed while waiting (or before the wait began)."""


class Deadline:
    """``await deadline.wait(aw)`` waits for ``aw`` until ``when`` (a loop time; None:
    for ever), or, with ``within``, for at most that many seconds from now; ``close()``
    when done with the stream."""

    def __init__(self, when: float | None = None) -> None:
        self._when = when
        self._handle: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Task[Any] | None = None  # the task in a wait, if any
        self._fired = False

    async def wait(self, aw: Awaitable[T], within: float | None = None) -> T:
        loop = asyncio.get_running_loop()
        if within is not None:
            self._when = loop.time() + within
        if self._when is None:
            return await aw
        if self._when <= loop.time():
            if (close := getattr(aw, "close", None)) is not None:
                close()  # never awaited: say so to nobody
            raise Expired
        self._waiter = task = asyncio.current_task()
        if self._handle is None:
            self._handle = loop.call_at(self._when, self._check)
        try:
            return await aw
        except asyncio.CancelledError:
            if self._fired:
                self._fired = False
                if task is not None and task.uncancel() == 0:
                    raise Expired from None
            raise
        finally:
            self._waiter = None

    def _check(self) -> None:
        self._handle = None
        if self._waiter is None or self._when is None:
            return  # not waiting: the next wait sets the timer
        loop = asyncio.get_running_loop()
        if self._when - loop.time() > 0.001:  # the limit moved since the timer was set
            self._handle = loop.call_at(self._when, self._check)
            return
        self._fired = True
        self._waiter.cancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
