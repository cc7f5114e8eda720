"""Redis backend of the scheduler: the task queue and the worker pool shared by every
coordinator on one Redis (redis-py's asyncio client; the prompt cache is ``redis_cache.py``).

Keys (prefix ``cyllm:``)::

    q:<model>   ZSET   waiting tasks; score = (100 - priority) * 2**40 + arrival seq
    qlen        INT    waiting tasks over all models (the queue's bound)
    task:<id>   HASH   model, owner (coordinator id), score, worker (once taken)
    leases      ZSET   taken tasks -> lease expiry (ms, Redis clock)
    workers     SET    worker ids;  w:<id> HASH info (WorkerInfo bytes), hb, progress,
                       running, tokens, outstanding (over all coordinators)
    wait:<id>   STR    a waiting task's mark: its coordinator waits for it (expires
                       unless that coordinator refreshes it, each second)
    c:...              the prompt cache (``redis_cache.py``)

A request is run by the coordinator that received it (it holds the client's stream),
but it waits in the shared queue, in global priority order per model: a coordinator
takes a slot only for a task that is at the head of its model's queue, and taking it
(pop + slot reservation) is one Lua script, so two coordinators never take the same
task or overfill a worker.  A taken task holds a lease that its coordinator renews; a
coordinator that dies (or whose release was lost while Redis was unreachable) lets the
lease expire, and any coordinator then puts the task back in its place in the queue and
frees the worker slot.  A retried request (the gateway retries elsewhere when its
coordinator is unreachable) adopts its waiting task instead of queueing a second copy.
A task nobody waits for any more (its mark lapsed: its coordinator died, or it came
back from a lease no retry adopted) is dropped when it reaches the head, by whichever
coordinator looks; a coordinator queues again its waiting tasks that Redis lost.  Times
come from Redis's clock, so coordinators need not agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError
from redis.typing import EncodableT, FieldT

from cyllm.coordinator import redis_scripts as lua
from cyllm.coordinator.owners import OWNERS_KEY, ModelOwners
from cyllm.coordinator.pool import HealthRules, WorkerRecord, keeps_outstanding
from cyllm.coordinator.queue import Task
from cyllm.coordinator.routing import Router
from cyllm.coordinator.scheduler import Keep, Scheduler, Waiter, WorkerView
from cyllm.protocol import pb
from cyllm.shared_state import GONE, members

if TYPE_CHECKING:  # it imports this module
    from cyllm.coordinator.redis_cache import RedisPromptCache

log = logging.getLogger(__name__)

P = "cyllm:"
PUMP_CHANNEL = P + "pump"


async def redis_now(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1e6


@dataclass
class _View:
    """The pool and the model owners as one read found them (``_POOL``)."""

    read_at: float  # this process's monotonic clock at the read
    now: float  # Redis's clock at the read
    records: list[WorkerRecord]
    owners: dict[str, str]

    def clock(self) -> float:
        """Redis's clock now, as well as this process can tell without asking."""
        return self.now + (time.monotonic() - self.read_at)


def _record(row: list[bytes]) -> WorkerRecord | None:
    f = dict(zip(row[::2], row[1::2]))
    if not f.get(b"info"):
        return None
    return WorkerRecord(
        info=pb.WorkerInfo.FromString(f[b"info"]),
        last_heartbeat=int(f.get(b"hb", 0)) / 1000,
        outstanding=int(f.get(b"outstanding", 0)),
        running=int(f.get(b"running", 0)),
        tokens=int(f.get(b"tokens", 0)),
        progress_at=int(f.get(b"progress", 0)) / 1000,
    )


class RedisScheduler(Scheduler):
    """A request costs two round trips to Redis here: its admission (queued, and its slot
    taken at once when a worker has room: ``_ADMIT``) and its release.  Admissions decide
    on a view of the pool at most ``VIEW_S`` old, kept by this process (the scripts
    check the slot itself, so a view that is behind costs a wait in the queue, never an
    overfilled worker); the dispatch of queued tasks reads the pool afresh."""

    backend = "redis"
    leased = True
    POLL_S = 0.25  # pump at least this often while tasks wait (pub/sub may drop wakes)
    VIEW_S = 0.25

    def __init__(
        self,
        client: aioredis.Redis,
        coordinator_id: str,
        rules: HealthRules,
        router: Router,
        owners: ModelOwners,
        *,
        queue_timeout_s: float,
        max_size: int,
        retry_after_s: float,
        lease_s: float,
    ) -> None:
        """``owners``: read here in one script with the pool (its hash in Redis)."""
        super().__init__(
            rules,
            router,
            owners,
            queue_timeout_s=queue_timeout_s,
            max_size=max_size,
            retry_after_s=retry_after_s,
        )
        self.r = client
        self.coordinator_id = coordinator_id
        self.lease_ms = int(lease_s * 1000)
        # A waiting task's mark lives this long unless its coordinator refreshes it.
        self.wait_ms = 5000
        self._waiting: dict[str, Waiter] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._view: _View | None = None
        self._admit = client.register_script(lua.ADMIT)
        self._pool = client.register_script(lua.POOL)
        self._claim = client.register_script(lua.CLAIM)
        self._release = client.register_script(lua.RELEASE)
        self._withdraw_script = client.register_script(lua.WITHDRAW)
        self._reap = client.register_script(lua.REAP)
        self._drop_orphan = client.register_script(lua.DROP_ORPHAN)
        self._heartbeat = client.register_script(lua.HEARTBEAT)
        self._renew = client.register_script(lua.RENEW)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self.r.ping()
        self._tasks = [
            asyncio.create_task(self._housekeeping()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._pump_loop()),
        ]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: a stop must not wait on a subscription mid-handshake
            await asyncio.wait(self._tasks, timeout=5)
        await self.r.aclose()

    async def _housekeeping(self) -> None:
        down = False
        while True:
            try:
                await self._keep_waiting()
                if await self._reap(keys=[P + "leases", P + "qlen"], args=[P]):
                    await self._notify()
                if down:
                    log.warning("redis is reachable again")
                down = False
            except Exception as exc:  # Redis unreachable for a moment: keep trying
                if not down:  # once per outage, not once a second
                    log.warning("redis unreachable (%s); requests get 503 until it is back", exc)
                down = True
            await asyncio.sleep(min(1.0, self.lease_ms / 3000))

    async def _keep_waiting(self) -> None:
        """Refresh the marks saying this coordinator waits for its queued tasks, and queue
        again those Redis no longer has (it restarted without them, or a replica without
        the last writes took over): their callers are still here, waiting."""
        waiting = [w for w in self._waiting.values() if w.queued and not w.future.done()]
        if not waiting:
            return
        async with self.r.pipeline(transaction=False) as pipe:
            for w in waiting:
                pipe.set(P + f"wait:{w.task.task_id}", self.coordinator_id, px=self.wait_ms)
                pipe.exists(P + f"task:{w.task.task_id}")
            replies = await pipe.execute()
        for w, there in zip(waiting, replies[1::2]):
            if not there and not w.future.done():
                log.warning("task %s was lost from redis; queued again", w.task.task_id)
                # They were admitted already: the bound does not refuse them now.
                await self._enqueue_task(w.task, self.max_size + len(waiting))
                self._wake.set()

    async def _listen(self) -> None:
        while True:  # Redis restarted: subscribe again (the pump polls meanwhile)
            pubsub = self.r.pubsub()
            try:
                await pubsub.subscribe(PUMP_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._wake.set()
            except GONE as exc:
                log.warning("redis subscription lost (%s); subscribing again", exc)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):  # a cancelled subscribe may never answer
                        await pubsub.aclose()

    async def _notify(self) -> None:
        await self.r.publish(PUMP_CHANNEL, b"1")

    # -- workers ------------------------------------------------------------------------

    async def register(self, info: pb.WorkerInfo) -> None:
        key = P + f"w:{info.worker_id}"
        old = await self.r.hget(key, "info")
        keep = keeps_outstanding(pb.WorkerInfo.FromString(old) if old else None, info)
        now_ms = int(await redis_now(self.r) * 1000)
        fields: dict[FieldT, EncodableT] = {
            "info": info.SerializeToString(),
            "capacity": info.capacity,
            "hb": now_ms,
            "progress": now_ms,
            "running": 0,
            "tokens": 0,
        }
        if not keep:
            fields["outstanding"] = 0
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.sadd(P + "workers", info.worker_id)
            await pipe.execute()
        self._view = None
        await self._notify()

    async def heartbeat(self, worker_id: str, running: int, tokens: int) -> bool:
        known = await self._heartbeat(keys=[P + f"w:{worker_id}"], args=[running, tokens])
        if known:
            await self._notify()
        return bool(known)

    async def deregister(self, worker_id: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(P + f"w:{worker_id}")
            pipe.srem(P + "workers", worker_id)
            await pipe.execute()
        self._view = None

    async def _read(self) -> _View:
        secs, micros, rows, owners = await self._pool(keys=[P + "workers", OWNERS_KEY], args=[P])
        records = sorted((r for r in map(_record, rows) if r), key=lambda r: r.worker_id)
        self._view = _View(
            time.monotonic(),
            int(secs) + int(micros) / 1e6,
            records,
            {k.decode(): v.decode() for k, v in zip(owners[::2], owners[1::2])},
        )
        return self._view

    async def _current(self) -> _View:
        view = self._view
        if view is None or time.monotonic() - view.read_at > self.VIEW_S:
            view = await self._read()
        return view

    async def workers(self) -> list[WorkerView]:
        view = await self._read()
        return [
            WorkerView(w, self.rules.check(w, view.now), view.now - w.last_heartbeat) for w in view.records
        ]

    async def view(self) -> tuple[list[WorkerView], dict[str, str]]:
        view = await self._current()
        now = view.clock()
        return [
            WorkerView(w, self.rules.check(w, now), now - w.last_heartbeat) for w in view.records
        ], view.owners

    # -- tasks --------------------------------------------------------------------------

    async def _enqueue(self, waiter: Waiter) -> None:
        task = waiter.task
        # Known here before it is in Redis: a dispatch running meanwhile must see its
        # waiter, or it would take the task at the head for one nobody waits for.
        self._waiting[task.task_id] = waiter
        try:
            view = await self._current()
            worker = self.router.choose(
                self._free(view.records, task.model, waiter.exclude, view.clock()), task.affinity
            )
            added = await self._enqueue_task(task, self.max_size, worker)
        except BaseException:
            self._forget(waiter)
            raise
        if added == 4:  # at the head, and the worker had room: its slot is taken
            assert worker is not None  # only a given worker's slot is taken
            worker.outstanding += 1
            waiter.future.set_result(worker.info)
            return
        if added == 1 and worker is not None:  # the view was behind: read it again next
            self._view = None
        if added in (0, 3):
            self._forget(waiter)
        if added == 0:
            raise self.queue_full()
        if added == 3:
            # It ran (or runs) through a coordinator its caller lost: this is a new run,
            # under a new id, so the two never share a task record.
            task.task_id = uuid.uuid4().hex
            return await self._enqueue(waiter)
        waiter.queued = True  # 1: queued; 2: adopted (a retry of ours)
        self._wake.set()

    async def _enqueue_task(self, task: Task, limit: int, worker: WorkerRecord | None = None) -> int:
        """The admission script (``_ADMIT``): 0 full, 1 queued, 2 adopted, 3 exists and is
        not waiting, 4 queued and given ``worker``'s slot at once."""
        wid = worker.worker_id if worker is not None else ""
        return await self._admit(
            keys=[
                P + "qlen",
                P + f"q:{task.model}",
                P + f"task:{task.task_id}",
                P + "seq",
                P + f"wait:{task.task_id}",
                P + f"w:{wid}",
                P + "leases",
            ],
            args=[
                task.task_id,
                task.model,
                self.coordinator_id,
                task.priority,
                limit,
                self.wait_ms,
                self.lease_ms,
                wid,
            ],
        )

    def _forget(self, waiter: Waiter) -> None:
        if self._waiting.get(waiter.task.task_id) is waiter:
            del self._waiting[waiter.task.task_id]

    async def _withdraw(self, task: Task) -> None:
        await self._withdraw_script(
            keys=[P + f"q:{task.model}", P + f"task:{task.task_id}", P + "qlen"], args=[task.task_id]
        )

    async def release(self, task: Task, worker_id: str, keep: Keep | None = None) -> None:
        keys = [P + f"w:{worker_id}", P + f"task:{task.task_id}", P + "leases"]
        args = [task.task_id, PUMP_CHANNEL]
        if keep is None or not await self._release_keeping(keys, args, keep):
            await self._release(keys=keys, args=args)
            if keep is not None:
                await keep.cache.put(keep.key, keep.value)
        for record in self._view.records if self._view else ():
            if record.worker_id == worker_id:
                record.outstanding = max(0, record.outstanding - 1)

    async def _release_keeping(self, keys: list[str], args: list, keep: Keep) -> bool:
        """Release and cache store in one pipeline by the scripts' hashes: one round trip
        (redis-py's own script pipelining checks the scripts first: two).  False where it
        cannot (a cache elsewhere, a Redis that lost its scripts): the caller does both by
        name (releasing twice is a no-op)."""
        if not (keep.cache.enabled and keep.cache.redis is self.r):
            return False
        pipe = self.r.pipeline(transaction=False)
        pipe.evalsha(self._release.sha, len(keys), *keys, *args)
        cache = cast("RedisPromptCache", keep.cache)  # it stores through our Redis: the Redis cache
        cache.queue_put(pipe, keep.key, keep.value)
        try:
            await pipe.execute()
        except NoScriptError:
            return False
        return True

    async def renew(self, task: Task) -> None:
        await self._renew(keys=[P + "leases"], args=[task.task_id, self.lease_ms])

    async def queue_depth(self) -> int:
        return int(await self.r.get(P + "qlen") or 0)

    async def _pump_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.POLL_S):
                    await self._wake.wait()
            self._wake.clear()
            if not any(w.queued for w in self._waiting.values()):
                continue
            try:
                await self._pump()
            except Exception as exc:  # housekeeping reports an outage, once
                log.debug("dispatch from redis failed (%s); retrying", exc)

    async def _pump(self) -> None:
        models = {w.task.model for w in self._waiting.values() if w.queued}
        view = await self._read()
        now, records = view.now, view.records
        for model in models:
            qkey = P + f"q:{model}"
            while True:
                head = members(await self.r.zrange(qkey, 0, 0))
                if not head:
                    break
                waiter = self._waiting.get(head[0].decode())
                if waiter is None or waiter.future.done():
                    # Another coordinator's turn, unless nobody waits for it any more.
                    if await self._drop_orphan(keys=[qkey, P + "qlen"], args=[P, head[0]]):
                        log.info(
                            "dropped task %s at the head of the queue: nobody waits for it", head[0].decode()
                        )
                        continue
                    break
                worker = self.router.choose(
                    self._free(records, model, waiter.exclude, now), waiter.task.affinity
                )
                if worker is None:
                    break
                got = await self._claim(
                    keys=[
                        qkey,
                        P + f"task:{waiter.task.task_id}",
                        P + f"w:{worker.worker_id}",
                        P + "qlen",
                        P + "leases",
                    ],
                    args=[waiter.task.task_id, self.lease_ms, worker.worker_id],
                )
                if got == 1:
                    worker.outstanding += 1
                    waiter.future.set_result(worker.info)
                elif got == -1:  # another coordinator filled that slot first
                    view = await self._read()
                    now, records = view.now, view.records
                else:
                    break
