"""One thread for each model's native compute.

Each thread that runs a CPU kernel of torch or of llama.cpp (both parallelise with
OpenMP) keeps an OpenMP team of its own for as long as it lives.  Once a process holds
more team threads than it has cores, libgomp stops letting idle team threads spin
between kernels: they sleep, and every kernel of a step wakes them again.  A decode
step is hundreds of kernels, so a model that is stepped from whichever pool thread is
free, or loaded in one thread and run in another, runs far below its speed.  Measured
on 2 cores with the default model: a transformers decode step took 30 ms after a load
in a pool thread and 20 ms with load and steps on one thread; llama.cpp served one
stream at 49-151 tok/s depending on which pool thread it landed on, and at 150 on its
own thread.

So each model computes on one thread for its life: the transformers engine on its
scheduler thread (load included), everything else through a :class:`ComputeThread`;
one-off work (converting a model) runs :func:`once`, on a thread that ends with it and
takes its team along.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A thread that runs one model's blocking calls, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the thread; awaitable from the running loop."""
        return asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False)


async def once(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a thread that ends when it returns."""
    thread = ComputeThread("once")
    try:
        return await thread.run(fn, *args)
    finally:
        thread.close()
