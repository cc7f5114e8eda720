"""Hands queued tasks to worker slots.

A request waits in the :class:`TaskQueue` until ``pump`` finds a worker with a free
slot for its model; it then holds that slot until ``release``.  ``pump`` runs whenever
work arrives or capacity may have appeared (a release, a registration, a heartbeat).
"""

from __future__ import annotations

import asyncio

from cyllm import errors
from cyllm.coordinator.queue import Task, TaskQueue
from cyllm.coordinator.registry import WorkerEntry, WorkerRegistry


class Dispatcher:
    def __init__(self, queue: TaskQueue, registry: WorkerRegistry, timeout_s: float) -> None:
        self.queue = queue
        self.registry = registry
        self.timeout_s = timeout_s
        self._waiting: dict[Task, asyncio.Future[WorkerEntry]] = {}

    async def acquire(self, task: Task) -> WorkerEntry:
        """Wait in the queue for a slot; raises Overloaded when the queue is full."""
        future: asyncio.Future[WorkerEntry] = asyncio.get_running_loop().create_future()
        self.queue.push(task)
        self._waiting[task] = future
        self.pump()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.shield(future)
        except TimeoutError:
            if future.done():  # the slot arrived as the clock ran out: use it
                return future.result()
            raise errors.Unavailable(
                f"no worker slot for model {task.model!r} became free within "
                f"{self.timeout_s:g}s"
            ) from None
        finally:
            self._waiting.pop(task, None)
            # Still queued: nothing was reserved.  Reserved but our caller is gone: give back.
            if not self.queue.remove(task) and future.done() and _abandoned():
                self.release(future.result())

    def release(self, worker: WorkerEntry) -> None:
        worker.outstanding = max(0, worker.outstanding - 1)
        self.pump()

    def pump(self) -> None:
        while True:
            picked: list[WorkerEntry] = []

            def ready(task: Task) -> bool:
                worker = self.registry.pick(task.model)
                if worker is not None:
                    picked.append(worker)
                return worker is not None

            task = self.queue.pop_first(ready)
            if task is None:
                return
            worker = picked[-1]
            future = self._waiting.get(task)
            if future is None or future.done():
                continue  # its caller already left
            worker.outstanding += 1
            future.set_result(worker)


def _abandoned() -> bool:
    """True when the current task is being cancelled (the slot will never be used)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
