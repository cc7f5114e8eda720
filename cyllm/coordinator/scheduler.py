"""Where a request waits for a worker slot, and the worker pool it waits on.

``Scheduler`` is what the coordinator's service sees: workers register and heartbeat;
a request is ``acquire``d a slot on a healthy worker that serves its model (waiting in
the priority queue meanwhile) and ``release``s it when done.  ``MemoryScheduler`` keeps
all of it in this process (the embedded default); ``RedisScheduler``
(``redis_backend.py``) shares it between coordinators.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from cyllm import errors
from cyllm.coordinator.pool import HealthRules, Router, WorkerRecord
from cyllm.coordinator.queue import InMemoryTaskQueue, Task
from cyllm.protocol import pb


@dataclass(frozen=True)
class WorkerView:
    record: WorkerRecord
    unhealthy_reason: str
    heartbeat_age_s: float

    @property
    def healthy(self) -> bool:
        return not self.unhealthy_reason


class Scheduler(abc.ABC):
    backend = "abstract"

    def __init__(self, rules: HealthRules, router: Router, queue_timeout_s: float) -> None:
        self.rules = rules
        self.router = router
        self.queue_timeout_s = queue_timeout_s

    async def start(self) -> None:
        """Begin background work (timers, subscriptions)."""

    async def close(self) -> None:
        """Stop background work and release connections."""

    # -- the worker side
    @abc.abstractmethod
    async def register(self, info: pb.WorkerInfo) -> None: ...

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str, running: int, tokens: int) -> bool:
        """False when the worker is unknown (it must register again)."""

    @abc.abstractmethod
    async def deregister(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def workers(self) -> list[WorkerView]: ...

    # -- the request side
    @abc.abstractmethod
    async def acquire(self, task: Task, exclude: Iterable[str] = ()) -> pb.WorkerInfo:
        """Queue ``task`` until a slot is free; Overloaded when the queue is full."""

    @abc.abstractmethod
    async def release(self, task: Task, worker_id: str) -> None: ...

    @abc.abstractmethod
    async def renew(self, task: Task) -> None:
        """Extend the lease of a running task (a no-op where leases do not exist)."""

    @abc.abstractmethod
    async def queue_depth(self) -> int: ...

    @property
    @abc.abstractmethod
    def queue_capacity(self) -> int: ...

    async def models(self) -> list[pb.ModelInfo]:
        """Loaded models of healthy workers, then catalog entries loaded nowhere."""
        seen: dict[str, pb.ModelInfo] = {}
        available: dict[str, pb.ModelInfo] = {}
        for view in await self.workers():
            if view.healthy:
                for m in view.record.info.models:
                    seen.setdefault(m.id, m)
                for m in view.record.info.available:
                    available.setdefault(m.id, m)
        for mid, m in available.items():
            seen.setdefault(mid, m)
        return sorted(seen.values(), key=lambda m: m.id)

    async def check_model(self, model: str) -> None:
        """ModelNotFound (listing what exists) or Unavailable (it exists, all unhealthy)."""
        if not model:
            raise errors.InvalidRequest("model is required", param="model")
        views = await self.workers()
        serving = [v for v in views if v.record.serves(model)]
        if serving and not any(v.healthy for v in serving):
            reasons = "; ".join(f"{v.record.worker_id}: {v.unhealthy_reason}" for v in serving)
            raise errors.Unavailable(f"every worker serving model {model!r} is unhealthy ({reasons})")
        if serving and all(v.record.training_busy for v in serving if v.healthy):
            jobs = ", ".join(f"{v.record.worker_id}: {v.record.info.training_job}" for v in serving)
            raise errors.Unavailable(
                f"every worker serving model {model!r} is busy training ({jobs}); wait for the "
                "job to end, or set worker.training_shares_device to serve while training")
        if not serving and any(m.id == model for v in views for m in v.record.info.available):
            raise errors.ModelNotFound(
                f"model {model!r} is not loaded; an admin can load it with "
                f"POST /api/v1/models/{model}/load", param="model")
        if not serving:
            known = sorted({m.id for v in views if v.healthy for m in v.record.info.models})
            raise errors.ModelNotFound(
                f"model {model!r} does not exist; available models: {', '.join(known) or 'none'}",
                param="model",
            )

    def _free(self, records: Iterable[WorkerRecord], model: str, exclude: Iterable[str],
              now: float) -> list[WorkerRecord]:
        """Healthy workers serving ``model`` with a free slot (``now`` on the records' clock)."""
        skip = set(exclude)
        return [
            w for w in records
            if w.serves(model) and w.worker_id not in skip and w.outstanding < w.info.capacity
            and not self.rules.check(w, now) and not w.training_busy
        ]


class MemoryScheduler(Scheduler):
    """Everything in this process.  ``pump`` hands queued tasks to free slots whenever
    work arrives or capacity may have appeared (a release, a registration, a heartbeat)."""

    backend = "memory"

    def __init__(self, queue: InMemoryTaskQueue, rules: HealthRules, router: Router,
                 queue_timeout_s: float, clock=time.monotonic) -> None:
        super().__init__(rules, router, queue_timeout_s)
        self.clock = clock
        self.queue = queue
        self._workers: dict[str, WorkerRecord] = {}
        self._waiting: dict[Task, tuple[asyncio.Future[WorkerRecord], frozenset[str]]] = {}

    async def register(self, info: pb.WorkerInfo) -> None:
        now = self.clock()
        old = self._workers.get(info.worker_id)
        record = WorkerRecord(info, now, progress_at=now)
        if old is not None and old.info.address == info.address:
            record.outstanding = old.outstanding
        self._workers[info.worker_id] = record
        self.pump()

    async def heartbeat(self, worker_id: str, running: int, tokens: int) -> bool:
        record = self._workers.get(worker_id)
        if record is None:
            return False
        record.beat(self.clock(), running, tokens)
        self.pump()
        return True

    async def deregister(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    async def workers(self) -> list[WorkerView]:
        now = self.clock()
        return [WorkerView(w, self.rules.check(w, now), now - w.last_heartbeat)
                for w in self._workers.values()]

    async def acquire(self, task: Task, exclude: Iterable[str] = ()) -> pb.WorkerInfo:
        future: asyncio.Future[WorkerRecord] = asyncio.get_running_loop().create_future()
        self.queue.push(task)
        self._waiting[task] = (future, frozenset(exclude))
        self.pump()
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                return (await asyncio.shield(future)).info
        except TimeoutError:
            if future.done():  # the slot arrived as the clock ran out: use it
                return future.result().info
            raise errors.Unavailable(
                f"no worker slot for model {task.model!r} became free within {self.queue_timeout_s:g}s"
            ) from None
        finally:
            self._waiting.pop(task, None)
            # Still queued: nothing was reserved.  Reserved but our caller is gone: give back.
            if not self.queue.remove(task) and future.done() and caller_cancelled():
                self._give_back(future.result().worker_id)

    async def release(self, task: Task, worker_id: str) -> None:
        self._give_back(worker_id)

    async def renew(self, task: Task) -> None:
        return None

    def _give_back(self, worker_id: str) -> None:
        record = self._workers.get(worker_id)
        if record is not None:
            record.outstanding = max(0, record.outstanding - 1)
        self.pump()

    async def queue_depth(self) -> int:
        return len(self.queue)

    @property
    def queue_capacity(self) -> int:
        return self.queue.capacity

    def pump(self) -> None:
        while True:
            picked: list[WorkerRecord] = []

            def ready(task: Task) -> bool:
                _, exclude = self._waiting.get(task, (None, frozenset()))
                free = self._free(self._workers.values(), task.model, exclude, self.clock())
                worker = self.router.choose(free, task.affinity)
                if worker is not None:
                    picked.append(worker)
                return worker is not None

            task = self.queue.pop_first(ready)
            if task is None:
                return
            future, _ = self._waiting.get(task, (None, None))
            if future is None or future.done():
                continue  # its caller already left
            picked[-1].outstanding += 1
            future.set_result(picked[-1])


def caller_cancelled() -> bool:
    """True when the current task is being cancelled (a reserved slot will never be used)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
