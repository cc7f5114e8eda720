"""``Idempotency-Key``: one generation per key and tenant, whoever asks and however often.

A client whose gateway died mid-request cannot know whether its request ran; it sends
it again with the same key.  The first request with a key claims it and runs its
generation *detached* from its caller (a caller that leaves does not cancel it: the
result is what the retry wants); a request with the key while it runs attaches to it
(on this coordinator: the same task; on another: it waits for the stored result); after
it, the result is kept ``ttl_s`` and replayed.  A claim is a lease renewed while the
generation runs, so the key of a coordinator that died frees itself and a retry runs it
again.  A failed generation keeps nothing: its retry runs anew.  The same key with a
different request is refused.

The store is in this process (``MemoryIdempotencyStore``, bounded) or in Redis
(``RedisIdempotencyStore``), shared by every coordinator like the queue.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from cyllm import errors
from cyllm.coordinator.cache import CachedResponse, decode, encode

log = logging.getLogger(__name__)

PARAM = "Idempotency-Key"
MAX_KEY = 255


@dataclass(frozen=True)
class Claim:
    """What the store said: claimed (run it), ``result`` (done), or neither (running
    elsewhere); ``conflict``: the key was used for another request."""

    claimed: bool = False
    result: CachedResponse | None = None
    conflict: bool = False


def scoped(tenant: str, key: str) -> str:
    return hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()


class IdempotencyStore(abc.ABC):
    @abc.abstractmethod
    async def claim(self, key: str, fingerprint: str, owner: str, lease_s: float) -> Claim: ...

    @abc.abstractmethod
    async def renew(self, key: str, owner: str, lease_s: float) -> None: ...

    @abc.abstractmethod
    async def finish(self, key: str, owner: str, result: CachedResponse, ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def release(self, key: str, owner: str) -> None:
        """Forget a claim whose generation failed."""


class Idempotency:
    def __init__(
        self, store: IdempotencyStore, owner: str, ttl_s: float, lease_s: float, poll_s: float = 0.2
    ) -> None:
        self.store, self.owner = store, owner
        self.ttl_s, self.lease_s, self.poll_s = ttl_s, lease_s, poll_s
        self._running: dict[str, asyncio.Task[CachedResponse]] = {}

    async def run(
        self, key: str, fingerprint: str, produce: Callable[[], Awaitable[CachedResponse]]
    ) -> CachedResponse:
        while True:
            if (task := self._running.get(key)) is not None:
                return await asyncio.shield(task)
            claim = await self.store.claim(key, fingerprint, self.owner, self.lease_s)
            if claim.conflict:
                raise errors.InvalidRequest(
                    f"this {PARAM} was used for a different request; use a new key for a new request",
                    param=PARAM,
                )
            if claim.result is not None:
                return claim.result
            if claim.claimed:
                task = self._running[key] = asyncio.create_task(self._produce(key, produce))
                return await asyncio.shield(task)
            await asyncio.sleep(self.poll_s)  # running on another coordinator

    async def _produce(self, key: str, produce: Callable[[], Awaitable[CachedResponse]]) -> CachedResponse:
        renewer = asyncio.create_task(self._renew(key))
        try:
            result = await produce()
        except BaseException:
            await _quietly(self.store.release(key, self.owner))
            raise
        else:
            await _quietly(self.store.finish(key, self.owner, result, self.ttl_s))
            return result
        finally:
            renewer.cancel()
            self._running.pop(key, None)

    async def _renew(self, key: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await _quietly(self.store.renew(key, self.owner, self.lease_s))


async def _quietly(aw: Awaitable[None]) -> None:
    """The store unreachable a moment: the lease (or the TTL) settles it later."""
    try:
        await aw
    except Exception as exc:
        log.warning("idempotency store: %s", exc)


class MemoryIdempotencyStore(IdempotencyStore):
    """This process only; at most ``max_entries`` keys (the oldest go first)."""

    def __init__(self, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries, self.clock = max_entries, clock
        # key -> (fingerprint, owner, expires, result)
        self._keys: OrderedDict[str, tuple[str, str, float, CachedResponse | None]] = OrderedDict()

    async def claim(self, key: str, fingerprint: str, owner: str, lease_s: float) -> Claim:
        entry = self._keys.get(key)
        if entry is None or entry[2] <= self.clock():
            self._keys[key] = (fingerprint, owner, self.clock() + lease_s, None)
            while len(self._keys) > self.max_entries:
                self._keys.popitem(last=False)
            return Claim(claimed=True)
        if entry[0] != fingerprint:
            return Claim(conflict=True)
        return Claim(result=entry[3])

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        entry = self._keys.get(key)
        if entry is not None and entry[1] == owner and entry[3] is None:
            self._keys[key] = (entry[0], owner, self.clock() + lease_s, None)

    async def finish(self, key: str, owner: str, result: CachedResponse, ttl_s: float) -> None:
        entry = self._keys.get(key)
        if entry is not None and entry[1] == owner:
            self._keys[key] = (entry[0], owner, self.clock() + ttl_s, result)

    async def release(self, key: str, owner: str) -> None:
        entry = self._keys.get(key)
        if entry is not None and entry[1] == owner and entry[3] is None:
            del self._keys[key]


_CLAIM = """
-- KEYS: idem:<key>   ARGV: fingerprint, owner, lease_ms
local fp = redis.call('HGET', KEYS[1], 'fp')
if not fp then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'owner', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed'}
end
if fp ~= ARGV[1] then return {'conflict'} end
local result = redis.call('HGET', KEYS[1], 'result')
if result then return {'done', result} end
return {'running'}
"""

_OWNED = """
-- KEYS: idem:<key>   ARGV: owner, op ('renew' | 'finish' | 'release'), ms, result
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'result') == 1 then
  return 0
end
if ARGV[2] == 'release' then return redis.call('DEL', KEYS[1]) end
if ARGV[2] == 'finish' then redis.call('HSET', KEYS[1], 'result', ARGV[4]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[3])
"""


class RedisIdempotencyStore(IdempotencyStore):
    """``cyllm:idem:<sha256(tenant, key)>`` HASH fp, owner, result; expires by lease
    while running and by TTL once done."""

    def __init__(self, client: aioredis.Redis, prefix: str = "cyllm:") -> None:
        self.prefix = prefix + "idem:"
        self._claim = client.register_script(_CLAIM)
        self._owned = client.register_script(_OWNED)

    async def claim(self, key: str, fingerprint: str, owner: str, lease_s: float) -> Claim:
        reply = await self._claim(keys=[self.prefix + key], args=[fingerprint, owner, int(lease_s * 1000)])
        state = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        if state == "claimed":
            return Claim(claimed=True)
        if state == "conflict":
            return Claim(conflict=True)
        return Claim(result=decode(reply[1]) if state == "done" else None)

    async def renew(self, key: str, owner: str, lease_s: float) -> None:
        await self._owned(keys=[self.prefix + key], args=[owner, "renew", int(lease_s * 1000), ""])

    async def finish(self, key: str, owner: str, result: CachedResponse, ttl_s: float) -> None:
        await self._owned(
            keys=[self.prefix + key], args=[owner, "finish", max(1, int(ttl_s * 1000)), encode(result)]
        )

    async def release(self, key: str, owner: str) -> None:
        await self._owned(keys=[self.prefix + key], args=[owner, "release", 0, ""])
