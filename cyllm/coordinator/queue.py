"""The priority task queue: where a request waits for a worker slot.

Higher priority first, FIFO within a priority.  A full queue takes nothing more (the
scheduler answers Overloaded: HTTP 429 + Retry-After) instead of growing without bound.
This is the embedded default's queue (used by ``MemoryScheduler``); the shared one
lives in Redis (``redis_backend.py``), behind the same ``Scheduler`` interface.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class Task:
    task_id: str
    model: str
    priority: int = 0
    affinity: str = ""  # conversation prefix, for prefix-affinity routing
    seq: int = 0  # set by the queue: arrival order


@dataclass
class InMemoryTaskQueue:
    max_size: int
    _tasks: list[Task] = field(default_factory=list)  # kept sorted: priority desc, seq asc
    _counter: Iterator[int] = field(default_factory=itertools.count)

    def push(self, task: Task) -> bool:
        """Queue ``task``; False (and nothing queued) when the queue is full."""
        if len(self._tasks) >= self.max_size:
            return False
        task.seq = next(self._counter)
        # Insert after every task of the same or higher priority (stable FIFO).
        i = len(self._tasks)
        while i > 0 and self._tasks[i - 1].priority < task.priority:
            i -= 1
        self._tasks.insert(i, task)
        return True

    def pop_first(self, ready: Callable[[Task], bool]) -> Task | None:
        for i, task in enumerate(self._tasks):
            if ready(task):
                return self._tasks.pop(i)
        return None

    def remove(self, task: Task) -> bool:
        try:
            self._tasks.remove(task)
            return True
        except ValueError:
            return False

    def __len__(self) -> int:
        return len(self._tasks)
