"""A training job beside serving on the same device: inference first, the job still ends.

While a worker answers any inference call, the job's processes are stopped
(``SIGSTOP``) and continued (``SIGCONT``) once the worker has been idle a moment: a
request never waits for an optimizer step to end, and the job needs no cooperation
(custom scripts and every rank of a job yield alike).  Under unbroken load the job
still gets ``share`` of each ``PERIOD_S`` (``worker.training_share_under_load``), so it
finishes; 0 stops it for as long as the load lasts.  Paused time does not count
against the job's time limit, up to the limit again (a job ends within twice its
limit).  A stopped job keeps its memory: what it yields is compute.  See
docs/fine-tuning.md ("Training beside serving") for the measured cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

from cyllm.worker.training.processes import signal_job

PERIOD_S = 10.0  # under unbroken load: the job runs share x PERIOD_S of every PERIOD_S
LINGER_S = 0.25  # idle this long before the job continues (a caller's next request is often near)


class Demand:
    """How many inference calls the worker is answering now."""

    def __init__(self) -> None:
        self.active = 0
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        self.active += 1
        self._changed.set()
        try:
            yield
        finally:
            self.active -= 1
            self._changed.set()

    def arm(self) -> None:
        """Forget past changes: ``wait`` then returns at the next one."""
        self._changed.clear()

    async def wait(self, timeout: float | None) -> bool:
        """Whether ``active`` changed (since ``arm``) within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True


class Yielding:
    """Stops and continues one job's process group as ``demand`` comes and goes."""

    def __init__(
        self,
        demand: Demand,
        share: float,
        period: float = PERIOD_S,
        linger: float = LINGER_S,
        processes: int = 1,
    ):
        self.demand, self.share, self.period, self.linger = demand, share, period, linger
        self.processes = processes
        self.pauses = 0
        self._paused_s = 0.0
        self._since: float | None = None  # when the current pause began

    def paused_s(self) -> float:
        """Seconds the job has spent stopped, the current pause included."""
        return self._paused_s + (time.monotonic() - self._since if self._since is not None else 0.0)

    async def run(self, pgid: int) -> None:
        """Until cancelled; the group is left running."""
        held = self.period * (1 - self.share)  # longest pause under unbroken load
        try:
            while True:
                self.demand.arm()
                if not self.demand.active:
                    if self._since is None:
                        await self.demand.wait(None)
                    elif not await self.demand.wait(self.linger):
                        self._continue(pgid)
                    continue
                if self._since is None:
                    self._stop(pgid)
                    continue
                left = held - (time.monotonic() - self._since)
                if left <= 0 and self.share > 0:
                    self._continue(pgid)
                    await asyncio.sleep(self.period * self.share)  # the job's share
                    continue
                await self.demand.wait(left if self.share > 0 else None)
        finally:
            if self._since is not None:
                self._continue(pgid)

    def _stop(self, pgid: int) -> None:
        self._signal(pgid, signal.SIGSTOP)
        self._since = time.monotonic()
        self.pauses += 1

    def _continue(self, pgid: int) -> None:
        self._signal(pgid, signal.SIGCONT)
        if self._since is not None:
            self._paused_s += time.monotonic() - self._since
        self._since = None

    def _signal(self, pgid: int, sig: int) -> None:
        """The group at once; with several processes (torchrun's ranks have sessions of
        their own) each of them, found in /proc."""
        if self.processes == 1:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
        else:
            signal_job(pgid, sig)
