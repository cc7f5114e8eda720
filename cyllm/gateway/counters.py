"""What requests still running hold — a generation slot, tokens reserved under a
tokens-per-minute limit or a budget — and what a budget's period has spent.

A gateway that dies mid-request (SIGKILL, out of memory) never gives back what its
requests held.  A plain counter in Redis would keep that forever while the caller's
traffic kept refreshing its expiry: a caller locked out of its concurrency slots, a
limit or budget shrunk for good.  So in Redis what is held is a hash per counter with a
field per gateway process, and each gateway marks itself alive every ``ALIVE_EVERY_S``
in one sorted set (scored by Redis's clock, not the gateways'); a counter's total
counts the fields of live gateways only and drops the others as it reads.  A dead
gateway's holds are let go ``DEAD_AFTER_S`` after its last mark.

The change and the read are one Lua script, and the script can also add to and read a
spending counter: a budget's check (spent + held + this request) and its settlement
(held → spent) are each one step, so no request is ever seen as neither held nor spent.
Without Redis there is one gateway and nothing to let go: plain integers, changed with
no await in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis

from cyllm.shared_state import GONE, connect

log = logging.getLogger("cyllm.gateway.counters")
ALIVE_EVERY_S = 5.0
DEAD_AFTER_S = 30
LIVE = "cyllm:gateways:alive"
# A counter's hash lives an hour past its last change (its live fields are rewritten by
# every request that holds or lets go).
IDLE_TTL_S = 3600

_HOLD = """
local now = tonumber(redis.call('TIME')[1])
local mine = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if mine <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])  -- let go of all it held (or dropped while it seemed dead)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local n = tonumber(fields[i + 1])
  if fields[i] ~= ARGV[1] then
    local seen = redis.call('ZSCORE', KEYS[2], fields[i])
    if not seen or tonumber(seen) < now - tonumber(ARGV[4]) then
      redis.call('HDEL', KEYS[1], fields[i])
      n = 0
    end
  end
  if n > 0 then total = total + n end
end
local spent = 0
if #KEYS == 3 then
  spent = redis.call('INCRBY', KEYS[3], ARGV[5])
  redis.call('EXPIREAT', KEYS[3], ARGV[6])
end
return {total, spent}
"""

_ALIVE = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400)
"""


class Counters:
    def __init__(self, redis_url: str | None) -> None:
        self.redis: aioredis.Redis | None = connect(redis_url) if redis_url else None
        self.me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._local: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        if self.redis is not None:
            self._hold = self.redis.register_script(_HOLD)
            self._alive = self.redis.register_script(_ALIVE)

    async def hold(self, key: str, amount: int, spent: tuple[str, int, int] | None = None) -> tuple[int, int]:
        """Add ``amount`` (negative: let go) to what this gateway holds in ``key``; with
        ``spent`` = (its key, an amount, its expiry as unix seconds), add to that counter
        in the same step.  Returns what live gateways hold together and the spending."""
        if self.redis is None:
            self._local[key] = max(0, self._local.get(key, 0) + amount)
            if spent is None:
                return self._local[key], 0
            self._local[spent[0]] = self._local.get(spent[0], 0) + spent[1]
            return self._local[key], self._local[spent[0]]
        await self._mark_alive()
        keys = [key, LIVE]
        args: list[int | str] = [self.me, amount, IDLE_TTL_S, DEAD_AFTER_S]
        if spent is not None:
            keys.append(spent[0])
            args += [spent[1], spent[2]]
        total, spending = await self._hold(keys=keys, args=args)
        return int(total), int(spending)

    async def get(self, key: str) -> int | None:
        if self.redis is None:
            return self._local.get(key)
        found = await self.redis.get(key)
        return None if found is None else int(found)

    async def set_if_missing(self, key: str, value: int, expire_at: int) -> None:
        if self.redis is None:
            self._local.setdefault(key, value)
        else:
            await self.redis.set(key, value, nx=True, exat=expire_at)

    def forget(self, stale: Callable[[str], bool]) -> None:
        """Without Redis, drop the counters ``stale`` names (Redis expires its own)."""
        for key in [k for k in self._local if stale(k)]:
            del self._local[key]

    async def _mark_alive(self) -> None:
        """The first hold starts the marks (a gateway that holds nothing needs none)."""
        if self._task is None:
            self._task = asyncio.create_task(self._marking())
            await self._alive(keys=[LIVE], args=[self.me])

    async def _marking(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_EVERY_S)
            try:
                await self._alive(keys=[LIVE], args=[self.me])
            except GONE as exc:  # Redis away: the requests are refused with 503 meanwhile
                log.warning("could not mark this gateway alive in Redis: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.redis is not None:
            with contextlib.suppress(*GONE):
                await self.redis.zrem(LIVE, self.me)  # its holds go at once
            await self.redis.aclose()
