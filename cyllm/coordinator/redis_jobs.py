"""``JobStore`` in Redis, shared by every coordinator.

Keys (prefix ``cyllm:``): ``job:<id>`` the serialized ``TrainingJob``; ``jobs`` a ZSET of
ids by creation time (listing); ``job:<id>:events`` a ZSET of serialized events scored
by their sequence number, from the counter ``job:<id>:seq``; ``job:<id>:cancel`` the
cancel flag; ``jobs:queue`` the FIFO list of queued ids; ``job:<id>:lease`` the owning
coordinator's id with a TTL, and ``jobs:running`` the ids holding one; ``files`` a hash
of serialized ``FileInfo``; ``response:<id>`` a stored response, expiring by its TTL,
and ``responses:owner:<owner>`` a ZSET of each owner's ids by expiry (its oldest beyond
the cap go); ``batch:<id>`` a serialized ``Batch``, ``batches`` a ZSET of ids by creation
and ``batches:open`` those not final, ``batch:<id>:lease`` the runner with a TTL,
``batch:<id>:results`` a hash of each line's first result, ``batch:<id>:cancel`` its
cancel flag.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from cyllm.coordinator.jobs import FINAL_BATCH, JobStore
from cyllm.coordinator.redis_backend import P
from cyllm.protocol import pb
from cyllm.shared_state import connect, members, text

# Take a queued job: only the coordinator whose LREM removed it gets the lease.
_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""
_ENQUEUE = """
if redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
return redis.call('RPUSH', KEYS[1], ARGV[1])
"""
# Take a batch's lease, or renew it for the runner that holds it.
_LEASE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_UNLEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisJobStore(JobStore):
    def __init__(self, url: str) -> None:
        self.r: aioredis.Redis = connect(url)
        self._claim = self.r.register_script(_CLAIM)
        self._renew = self.r.register_script(_RENEW)
        self._enqueue = self.r.register_script(_ENQUEUE)
        self._lease = self.r.register_script(_LEASE)
        self._unlease = self.r.register_script(_UNLEASE)

    async def start(self) -> None:
        await self.r.ping()

    async def close(self) -> None:
        await self.r.aclose()

    async def put(self, job: pb.TrainingJob) -> None:
        job = _copy(job, pb.TrainingJob)
        job.cancel_requested = False
        async with self.r.pipeline(transaction=True) as p:
            p.set(P + f"job:{job.id}", job.SerializeToString())
            p.zadd(P + "jobs", {job.id: job.created_at}, nx=True)
            await p.execute()

    async def get(self, job_id: str) -> pb.TrainingJob | None:
        raw, cancel = await self.r.mget(P + f"job:{job_id}", P + f"job:{job_id}:cancel")
        if raw is None:
            return None
        job = pb.TrainingJob.FromString(raw)
        job.cancel_requested = cancel is not None
        return job

    async def page(self, limit: int, after: str = "") -> tuple[list[pb.TrainingJob], bool]:
        start = 0
        if after:
            rank = await self.r.zrevrank(P + "jobs", after)
            if rank is None:
                return [], False
            assert isinstance(rank, int)  # asked without its score: the rank alone
            start = rank + 1
        ids = members(await self.r.zrevrange(P + "jobs", start, start + limit))
        jobs = [j for j in [await self.get(i.decode()) for i in ids[:limit]] if j is not None]
        return jobs, len(ids) > limit

    async def append_event(self, job_id: str, event: pb.TrainingEvent) -> int:
        event.seq = await self.r.incr(P + f"job:{job_id}:seq")
        await self.r.zadd(P + f"job:{job_id}:events", {event.SerializeToString(): event.seq})
        return event.seq

    async def events(self, job_id: str, after_seq: int = 0, limit: int = 0) -> list[pb.TrainingEvent]:
        raw = await self.r.zrangebyscore(
            P + f"job:{job_id}:events", f"({after_seq}", "+inf", start=0 if limit else None, num=limit or None
        )
        return [pb.TrainingEvent.FromString(x) for x in raw]

    async def request_cancel(self, job_id: str) -> None:
        await self.r.set(P + f"job:{job_id}:cancel", b"1")

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.r.exists(P + f"job:{job_id}:cancel"))

    async def enqueue(self, job_id: str) -> None:
        await self._enqueue(keys=[P + "jobs:queue"], args=[job_id])

    async def dequeue(self, job_id: str) -> bool:
        return bool(await self.r.lrem(P + "jobs:queue", 0, job_id))

    async def queued(self) -> list[str]:
        return [text(x) for x in await self.r.lrange(P + "jobs:queue", 0, -1)]

    async def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        keys = [P + "jobs:queue", P + f"job:{job_id}:lease", P + "jobs:running"]
        return bool(await self._claim(keys=keys, args=[job_id, owner, int(lease_s * 1000)]))

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        return bool(await self._renew(keys=[P + f"job:{job_id}:lease"], args=[owner, int(lease_s * 1000)]))

    async def release(self, job_id: str) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.delete(P + f"job:{job_id}:lease")
            p.srem(P + "jobs:running", job_id)
            await p.execute()

    async def expired(self) -> list[str]:
        running = [text(x) for x in await self.r.smembers(P + "jobs:running")]
        if not running:
            return []
        alive = await self.r.mget([P + f"job:{j}:lease" for j in running])
        return [j for j, lease in zip(running, alive) if lease is None]

    async def put_file(self, info: pb.FileInfo) -> None:
        await self.r.hset(P + "files", info.id, info.SerializeToString())

    async def get_file(self, file_id: str) -> pb.FileInfo | None:
        raw = await self.r.hget(P + "files", file_id)
        return None if raw is None else pb.FileInfo.FromString(raw)

    async def files(self) -> list[pb.FileInfo]:
        out = [pb.FileInfo.FromString(v) for v in (await self.r.hgetall(P + "files")).values()]
        return sorted(out, key=lambda f: (f.created_at, f.id))

    async def delete_file(self, file_id: str) -> bool:
        return bool(await self.r.hdel(P + "files", file_id))

    async def put_response(self, response: pb.StoredResponse, ttl_s: float, keep: int) -> None:
        """The response under its key with a TTL, and its id in its owner's sorted set
        (scored by expiry) so the owner's oldest beyond ``keep`` can go."""
        owned = P + f"responses:owner:{response.owner}"
        expires = time.time() + ttl_s
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(P + f"response:{response.id}", response.SerializeToString(), px=int(ttl_s * 1000))
            pipe.zadd(owned, {response.id: expires})
            pipe.zremrangebyscore(owned, "-inf", time.time())
            pipe.expire(owned, int(ttl_s) + 1)
            await pipe.execute()
        surplus = await self.r.zcard(owned) - keep
        if surplus > 0:
            old = [text(i) for i in await self.r.zrange(owned, 0, surplus - 1) if isinstance(i, (bytes, str))]
            await self.r.delete(*(P + f"response:{i}" for i in old))
            await self.r.zrem(owned, *old)

    async def get_response(self, response_id: str) -> pb.StoredResponse | None:
        raw = await self.r.get(P + f"response:{response_id}")
        return None if raw is None else pb.StoredResponse.FromString(raw)

    async def delete_response(self, response_id: str) -> bool:
        return bool(await self.r.delete(P + f"response:{response_id}"))

    async def put_batch(self, batch: pb.Batch) -> None:
        async with self.r.pipeline(transaction=True) as p:
            p.set(P + f"batch:{batch.id}", batch.SerializeToString())
            p.zadd(P + "batches", {batch.id: batch.created_at}, nx=True)
            if batch.status in FINAL_BATCH:
                p.zrem(P + "batches:open", batch.id)
            else:
                p.zadd(P + "batches:open", {batch.id: batch.created_at}, nx=True)
            await p.execute()

    async def get_batch(self, batch_id: str) -> pb.Batch | None:
        raw = await self.r.get(P + f"batch:{batch_id}")
        return None if raw is None else pb.Batch.FromString(raw)

    async def batches(self, open_only: bool = False) -> list[pb.Batch]:
        ids = [
            i.decode()
            for i in members(await self.r.zrange(P + ("batches:open" if open_only else "batches"), 0, -1))
        ]
        if not ids:
            return []
        raw = await self.r.mget([P + f"batch:{i}" for i in ids])
        return [pb.Batch.FromString(x) for x in raw if x is not None]

    async def claim_batch(self, batch_id: str, runner: str, lease_s: float) -> bool:
        return bool(
            await self._lease(keys=[P + f"batch:{batch_id}:lease"], args=[runner, int(lease_s * 1000)])
        )

    async def release_batch(self, batch_id: str, runner: str) -> None:
        await self._unlease(keys=[P + f"batch:{batch_id}:lease"], args=[runner])

    async def add_batch_results(self, batch_id: str, results: list[pb.BatchResult]) -> list[pb.BatchResult]:
        key = P + f"batch:{batch_id}:results"
        async with self.r.pipeline(transaction=True) as p:
            for r in results:
                p.hsetnx(key, str(r.index), r.SerializeToString())
            added = await p.execute()
        return [r for r, new in zip(results, added) if new]

    async def batch_done(self, batch_id: str) -> list[int]:
        return sorted(int(text(k)) for k in await self.r.hkeys(P + f"batch:{batch_id}:results"))

    async def batch_results(self, batch_id: str, start: int, stop: int) -> list[pb.BatchResult]:
        if stop <= start:
            return []
        raw = await self.r.hmget(P + f"batch:{batch_id}:results", [str(i) for i in range(start, stop)])
        return [pb.BatchResult.FromString(x) for x in raw if x is not None]

    async def drop_batch_results(self, batch_id: str) -> None:
        await self.r.delete(P + f"batch:{batch_id}:results")

    async def cancel_batch(self, batch_id: str) -> None:
        await self.r.set(P + f"batch:{batch_id}:cancel", b"1")

    async def batch_cancelled(self, batch_id: str) -> bool:
        return bool(await self.r.exists(P + f"batch:{batch_id}:cancel"))


def _copy(message, cls):
    out = cls()
    out.CopyFrom(message)
    return out
