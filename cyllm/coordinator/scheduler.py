"""Where a request waits for a worker slot, and the worker pool it waits on.

``Scheduler`` is what the coordinator's service sees: workers register and heartbeat;
a request is ``acquire``d a slot on a healthy worker that serves its model (waiting in
the priority queue meanwhile) and ``release``s it when done.  How a request waits is
written once, here (``acquire``); a backend says only how a task enters and leaves its
queue (``_enqueue``, ``_forget``) and hands slots to waiters as they free up.
``MemoryScheduler`` keeps all of it in this process (the embedded default);
``RedisScheduler`` (``redis_backend.py``) shares it between coordinators.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cyllm import errors
from cyllm.coordinator.cache import CachedResponse, PromptCache
from cyllm.coordinator.owners import ModelOwners
from cyllm.coordinator.pool import HealthRules, WorkerRecord, keeps_outstanding
from cyllm.coordinator.queue import InMemoryTaskQueue, Task
from cyllm.coordinator.routing import Router
from cyllm.protocol import pb
from cyllm.protocol.tenant import PUBLIC


@dataclass(frozen=True)
class Keep:
    """A finished answer to store in the prompt cache as its slot is released."""

    cache: PromptCache
    key: str
    value: CachedResponse


@dataclass(frozen=True)
class WorkerView:
    record: WorkerRecord
    unhealthy_reason: str
    heartbeat_age_s: float

    @property
    def healthy(self) -> bool:
        return not self.unhealthy_reason


@dataclass(eq=False)
class Waiter:
    """A request waiting in ``acquire``: its future gets the worker whose slot it took."""

    task: Task
    future: asyncio.Future[pb.WorkerInfo]
    exclude: frozenset[str]
    queued: bool = False  # in the backend's queue (not still being admitted)


def unknown_model(model: str) -> errors.ModelNotFound:
    """What a caller is told of a model it cannot use: no list of what exists, since a
    caller may not see every model (another tenant's, or outside its key's allow-list)."""
    return errors.ModelNotFound(
        f"model {model!r} does not exist; GET /v1/models lists the models you can use", param="model"
    )


class Scheduler(abc.ABC):
    backend = "abstract"
    leased = False  # a running task holds a lease its coordinator must renew

    def __init__(
        self,
        rules: HealthRules,
        router: Router,
        owners: ModelOwners,
        *,
        queue_timeout_s: float,
        max_size: int,
        retry_after_s: float,
    ) -> None:
        """``owners``: who owns which model (a tenant's request may use only public
        models and its own)."""
        self.rules = rules
        self.router = router
        self.owners = owners
        self.queue_timeout_s = queue_timeout_s
        self.max_size = max_size
        self.retry_after_s = retry_after_s

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
    async def acquire(self, task: Task, exclude: Iterable[str] = ()) -> pb.WorkerInfo:
        """Queue ``task`` until a healthy worker serving its model (and not in
        ``exclude``) has a free slot, and take that slot.  Overloaded when the queue is
        full, Unavailable after ``queue_timeout_s``; a caller cancelled while waiting
        leaves the queue, and one cancelled just as a slot arrived gives it back."""
        waiter = Waiter(task, asyncio.get_running_loop().create_future(), frozenset(exclude))
        await self._enqueue(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if waiter.future.done():  # the slot arrived as the clock ran out: use it
                return waiter.future.result()
            raise errors.Unavailable(
                f"no worker slot for model {task.model!r} became free within {self.queue_timeout_s:g}s"
            ) from None
        finally:
            self._forget(waiter)
            if not waiter.future.done():  # still queued: nothing was reserved
                await asyncio.shield(self._withdraw(task))
            elif caller_cancelled():  # reserved, but the caller is gone: give it back
                await asyncio.shield(self.release(task, waiter.future.result().worker_id))

    @abc.abstractmethod
    async def _enqueue(self, waiter: Waiter) -> None:
        """Put the waiter's task in the queue (``queue_full()`` when there is no room)
        and let the dispatch see the waiter."""

    @abc.abstractmethod
    def _forget(self, waiter: Waiter) -> None:
        """The waiter stopped waiting: the dispatch must no longer see it."""

    @abc.abstractmethod
    async def _withdraw(self, task: Task) -> None:
        """Take ``task`` out of the queue (it got no slot)."""

    def queue_full(self) -> errors.Overloaded:
        return errors.Overloaded(
            f"the task queue is full ({self.max_size} waiting); retry later", retry_after=self.retry_after_s
        )

    @abc.abstractmethod
    async def release(self, task: Task, worker_id: str, keep: Keep | None = None) -> None:
        """Free ``task``'s slot on the worker; ``keep``: a finished answer for the prompt
        cache, stored with the release (on Redis in the same round trip)."""

    @abc.abstractmethod
    async def renew(self, task: Task) -> None:
        """Extend the lease of a running task (a no-op where leases do not exist)."""

    @abc.abstractmethod
    async def queue_depth(self) -> int: ...

    @property
    def queue_capacity(self) -> int:
        return self.max_size

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

    async def view(self) -> tuple[list[WorkerView], dict[str, str]]:
        """The pool and the owners of fine-tuned models as a request is admitted.  A
        backend may answer from a view a moment old (``RedisScheduler``): the owners
        always as of the same moment as the workers or later, so a model a worker
        serves in the view has its owner in it (it is recorded before the model loads)."""
        return await self.workers(), await self.owners.all()

    async def check_model(self, model: str, sees: Callable[[str], bool] | None = None) -> str:
        """The model's owner (``PUBLIC`` for most); ModelNotFound (also for a model
        ``sees`` refuses: another tenant's reads as missing) or Unavailable (it exists,
        all unhealthy).  Decided on ``view()``; a refusal is decided again on a fresh
        reading, since the view may be behind."""
        if not model:
            raise errors.InvalidRequest("model is required", param="model")
        try:
            return self._check(model, sees, *await self.view())
        except errors.CyllmError:
            return self._check(model, sees, await self.workers(), await self.owners.all())

    def _check(
        self, model: str, sees: Callable[[str], bool] | None, views: list[WorkerView], owners: dict[str, str]
    ) -> str:
        owner = owners.get(model, PUBLIC)
        if sees is not None and not sees(owner):
            raise unknown_model(model)
        serving = [v for v in views if v.record.serves(model)]
        if serving and not any(v.healthy for v in serving):
            reasons = "; ".join(f"{v.record.worker_id}: {v.unhealthy_reason}" for v in serving)
            raise errors.Unavailable(f"every worker serving model {model!r} is unhealthy ({reasons})")
        if serving and all(v.record.training_busy for v in serving if v.healthy):
            # whose job it is, is not the caller's business (it may be another tenant's)
            raise errors.Unavailable(
                f"every worker serving model {model!r} is busy training; wait for the job to "
                "end, or set worker.training_shares_device to serve while training"
            )
        if not serving and any(m.id == model for v in views for m in v.record.info.available):
            raise errors.ModelNotFound(
                f"model {model!r} is not loaded; an admin can load it with POST /api/v1/models/{model}/load",
                param="model",
            )
        if not serving:
            raise unknown_model(model)
        return owner

    def _free(
        self, records: Iterable[WorkerRecord], model: str, exclude: Iterable[str], now: float
    ) -> list[WorkerRecord]:
        """Healthy workers serving ``model`` with a free slot (``now`` on the records' clock)."""
        skip = set(exclude)
        return [
            w
            for w in records
            if w.serves(model)
            and w.worker_id not in skip
            and w.outstanding < w.info.capacity
            and not self.rules.check(w, now)
            and not w.training_busy
        ]


class MemoryScheduler(Scheduler):
    """Everything in this process.  ``pump`` hands queued tasks to free slots whenever
    work arrives or capacity may have appeared (a release, a registration, a heartbeat)."""

    backend = "memory"

    def __init__(
        self,
        rules: HealthRules,
        router: Router,
        owners: ModelOwners,
        *,
        queue_timeout_s: float,
        max_size: int,
        retry_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            rules,
            router,
            owners,
            queue_timeout_s=queue_timeout_s,
            max_size=max_size,
            retry_after_s=retry_after_s,
        )
        self.clock = clock
        self.queue = InMemoryTaskQueue(max_size)
        self._workers: dict[str, WorkerRecord] = {}
        self._waiting: dict[Task, Waiter] = {}  # by identity: callers may reuse a request id

    async def register(self, info: pb.WorkerInfo) -> None:
        now = self.clock()
        old = self._workers.get(info.worker_id)
        record = WorkerRecord(info, now, progress_at=now)
        if old is not None and keeps_outstanding(old.info, info):
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
        return [
            WorkerView(w, self.rules.check(w, now), now - w.last_heartbeat) for w in self._workers.values()
        ]

    async def _enqueue(self, waiter: Waiter) -> None:
        if not self.queue.push(waiter.task):
            raise self.queue_full()
        self._waiting[waiter.task] = waiter
        self.pump()

    def _forget(self, waiter: Waiter) -> None:
        self._waiting.pop(waiter.task, None)

    async def _withdraw(self, task: Task) -> None:
        self.queue.remove(task)

    async def release(self, task: Task, worker_id: str, keep: Keep | None = None) -> None:
        record = self._workers.get(worker_id)
        if record is not None:
            record.outstanding = max(0, record.outstanding - 1)
        self.pump()
        if keep is not None:
            await keep.cache.put(keep.key, keep.value)

    async def renew(self, task: Task) -> None:
        return None

    async def queue_depth(self) -> int:
        return len(self.queue)

    def pump(self) -> None:
        while True:
            picked: list[WorkerRecord] = []

            def ready(task: Task, picked: list[WorkerRecord] = picked) -> bool:
                waiter = self._waiting.get(task)
                exclude = waiter.exclude if waiter else frozenset()
                free = self._free(self._workers.values(), task.model, exclude, self.clock())
                worker = self.router.choose(free, task.affinity)
                if worker is not None:
                    picked.append(worker)
                return worker is not None

            task = self.queue.pop_first(ready)
            if task is None:
                return
            waiter = self._waiting.get(task)
            if waiter is None or waiter.future.done():
                continue  # its caller already left
            picked[-1].outstanding += 1
            waiter.future.set_result(picked[-1].info)


def caller_cancelled() -> bool:
    """True when the current task is being cancelled (a reserved slot will never be used)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
