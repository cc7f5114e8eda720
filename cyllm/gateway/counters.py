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
The script marks its gateway alive too (a gateway that holds is alive, whatever became
of the set: a Redis flushed or restarted).  It never creates a spending counter: one
that is missing (a new period, a Redis that lost it) is seeded from the usage ledger by
the budget, which the settlement's tokens reach in the gateway's next usage report.

A hold and a let-go are never cut in half by a request being cancelled (a client gone
mid-stream): each runs shielded.  A let-go that Redis refuses (it is away) is kept and
tried again with the next marks, so a request's end is never lost.  What may be
miscounted: requests that were running through a Redis outage of more than
``DEAD_AFTER_S`` (their gateways' marks lapse, and the others stop counting them) —
until they end.  Without Redis there is one gateway and nothing to let go: plain
integers, changed with no await in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable

import anyio
import redis.asyncio as aioredis

from cyllm.shared_state import connect

log = logging.getLogger("cyllm.gateway.counters")
ALIVE_EVERY_S = 5.0
DEAD_AFTER_S = 30
LIVE = "cyllm:gateways:alive"
# A counter's hash lives an hour past its last change (its live fields are rewritten by
# every request that holds or lets go).
IDLE_TTL_S = 3600

_HOLD = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
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
local spent = -1
if #KEYS == 3 and redis.call('EXISTS', KEYS[3]) == 1 then
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
Spent = tuple[str, int, int]  # a spending counter's key, what to add, its expiry (unix s)
MAX_OWED = 100_000  # let-gos kept for a Redis that is away (their keys: callers x periods)


class Counters:
    def __init__(self, redis_url: str | None) -> None:
        self.redis: aioredis.Redis | None = connect(redis_url) if redis_url else None
        self.me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._local: dict[str, int] = {}
        self._owed: dict[tuple[str, str, int], tuple[int, int]] = {}  # let-gos Redis refused
        self._task: asyncio.Task[None] | None = None
        if self.redis is not None:
            self._hold = self.redis.register_script(_HOLD)
            self._alive = self.redis.register_script(_ALIVE)

    async def hold(self, key: str, amount: int, spent: Spent | None = None) -> tuple[int, int | None]:
        """Add ``amount`` to what this gateway holds in ``key`` and, with ``spent``, to a
        spending counter, in one step.  What live gateways hold together, and the
        spending (None: its counter does not exist, and nothing was added to it)."""
        if self.redis is None:
            self._local[key] = max(0, self._local.get(key, 0) + amount)
            if spent is None:
                return self._local[key], None
            if spent[0] in self._local:
                self._local[spent[0]] += spent[1]
            return self._local[key], self._local.get(spent[0])
        self._start_marks()
        keys = [key, LIVE]
        args: list[int | str] = [self.me, amount, IDLE_TTL_S, DEAD_AFTER_S]
        if spent is not None:
            keys.append(spent[0])
            args += [spent[1], spent[2]]
        with anyio.CancelScope(shield=True):  # done, or not, as a whole: never left unknown
            total, spending = await self._hold(keys=keys, args=args)
        return int(total), None if int(spending) < 0 else int(spending)

    async def let_go(self, key: str, amount: int, spent: Spent | None = None) -> None:
        """``hold(key, -amount, spent)`` that never fails: what Redis refuses is tried
        again with the next marks."""
        try:
            await self.hold(key, -amount, spent)
        except Exception as exc:
            log.warning("could not let go of %s in Redis (%s): tried again in %gs", key, exc, ALIVE_EVERY_S)
            self._owe(key, amount, spent)

    def _owe(self, key: str, amount: int, spent: Spent | None) -> None:
        name, tokens, expire_at = spent or ("", 0, 0)
        owed = self._owed.get((key, name, expire_at), (0, 0))
        if len(self._owed) >= MAX_OWED and (key, name, expire_at) not in self._owed:
            log.error("let-gos owed to Redis past %d keys: %s dropped", MAX_OWED, key)
            return
        self._owed[(key, name, expire_at)] = (owed[0] + amount, owed[1] + tokens)

    async def _pay(self) -> None:
        owed, self._owed = self._owed, {}
        for (key, name, expire_at), (amount, tokens) in owed.items():
            await self.let_go(key, amount, (name, tokens, expire_at) if name else None)

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

    def _start_marks(self) -> None:
        """The first hold starts the marks (a gateway that holds nothing needs none);
        marks that stopped start again."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._marking())

    async def _marking(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_EVERY_S)
            try:
                await self._alive(keys=[LIVE], args=[self.me])
            except Exception as exc:  # Redis away or refusing writes: requests get 503s meanwhile
                log.warning("could not mark this gateway alive in Redis: %s", exc)
                continue
            await self._pay()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self._pay()
                await self.redis.zrem(LIVE, self.me)  # its holds go at once
            await self.redis.aclose()
