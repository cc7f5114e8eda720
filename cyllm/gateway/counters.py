"""What requests still running hold — a generation slot, tokens reserved under a
tokens-per-minute limit or a budget — and what a budget's period has spent.

Each hold is its own entry, so holding and letting go are idempotent: a command that
redis-py sends again after a timeout, or a let-go tried again after Redis was away,
changes nothing the second time, and a budget's settlement adds its tokens to the
spending counter only when its let-go removed the entry.  In Redis a counter is a hash
of each gateway's subtotal, beside one hash of entries per gateway, so a call costs as
many steps as there are gateways, not requests; a let-go of an entry that is not there
(its hold still on its way, stalled on a dead connection) leaves a tombstone that keeps
that hold from landing later.  One Lua script marks the caller alive, changes one
entry and its subtotal, and — for a hold — adds up what live gateways hold and reads a
spending counter: a budget's check (spent + held + this request) and its settlement
(held → spent) are each one step, so no request is seen as neither held nor spent.
The script never creates a spending counter: one that is missing (a new period, a
Redis that lost it) is seeded from the usage ledger by the budget.

A gateway that dies mid-request (SIGKILL, out of memory) never lets go: each gateway
marks itself alive every ``ALIVE_EVERY_S`` in one sorted set (scored by Redis's clock)
and in every call, and the others drop a gateway's subtotal ``DEAD_AFTER_S`` after its
last mark (a gateway found alive after all rebuilds its subtotal from its entries).

A hold or let-go runs in a task of its own that the request's cancellation (a client
gone mid-stream, a hang-up watcher, a batch stopping) does not stop; a let-go waits for
its hold to land first; a let-go Redis refuses is kept (``MAX_OWED``; let-gos of holds
that failed themselves give way first) and paid in batches with the marks.  What may be
miscounted: requests that were running through a Redis outage of more than
``DEAD_AFTER_S`` (their gateways' marks lapse and the others stop counting them) until
they end, and their tokens in a budget's counter until the next period.  Without Redis
there is one gateway and nothing to let go: plain dicts, changed with no await.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from cyllm.shared_state import connect

log = logging.getLogger("cyllm.gateway.counters")
ALIVE_EVERY_S = 5.0
DEAD_AFTER_S = 30
LIVE = "cyllm:gateways:alive"
# A counter's hashes live a day past their last change (requests end well within it:
# gateway.request_timeout_s); a dead gateway's entries go with them.
IDLE_TTL_S = 86400
TOMBSTONE_S = 600  # longer than any command can stall on its way (socket_timeout x retries)
MAX_OWED = 100_000  # let-gos kept for a Redis that is away
PAY_AT_ONCE = 64  # owed let-gos in flight at once when Redis is back

# KEYS: the subtotals (gateway -> held), this gateway's entries, its tombstone for this
#       entry, the live gateways, [a spending counter]
# ARGV: gateway, entry, "hold" | "let_go" | "read", amount, idle ttl, dead after,
#       tombstone ttl, [what to add to the spending, its expiry (unix s)]
_CHANGE = """
local now = tonumber(redis.call('TIME')[1])
local me, entry, mode, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
redis.call('ZADD', KEYS[4], now, me)
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HDEL', KEYS[1], me)  -- its entries expired or lost: so is what they held
elseif redis.call('HEXISTS', KEYS[1], me) == 0 then
  local mine = 0  -- dropped while it seemed dead (or lost): rebuilt from its entries
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do mine = mine + tonumber(v) end
  redis.call('HSET', KEYS[1], me, mine)
end
local removed = 0
if mode == 'hold' then
  if redis.call('EXISTS', KEYS[3]) == 0 and redis.call('HSETNX', KEYS[2], entry, ARGV[4]) == 1 then
    redis.call('HINCRBY', KEYS[1], me, ARGV[4])
  end
elseif mode == 'let_go' then
  local held = redis.call('HGET', KEYS[2], entry)
  if held then
    redis.call('HDEL', KEYS[2], entry)
    redis.call('HINCRBY', KEYS[1], me, 0 - tonumber(held))  -- (-0 would be refused)
    removed = 1
  else
    redis.call('SET', KEYS[3], 1, 'EX', ARGV[7])  -- its hold, if on its way, never lands
  end
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local spent = -1
if #KEYS == 5 and redis.call('EXISTS', KEYS[5]) == 1 then
  if removed == 1 then
    redis.call('INCRBY', KEYS[5], ARGV[8])
    redis.call('EXPIREAT', KEYS[5], ARGV[9])
  end
  spent = tonumber(redis.call('GET', KEYS[5]))
end
if mode == 'let_go' then
  return {0, spent}
end
local total = 0
local subtotals = redis.call('HGETALL', KEYS[1])
for i = 1, #subtotals, 2 do
  local seen = redis.call('ZSCORE', KEYS[4], subtotals[i])
  if subtotals[i] == me or (seen and tonumber(seen) >= now - tonumber(ARGV[6])) then
    total = total + math.max(0, tonumber(subtotals[i + 1]))
  else
    redis.call('HDEL', KEYS[1], subtotals[i])
  end
end
return {total, spent}
"""

_ALIVE = """
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400)
"""
Spent = tuple[str, int, int]  # a spending counter's key, what to add, its expiry (unix s)


class Counters:
    def __init__(self, redis_url: str | None) -> None:
        self.redis: aioredis.Redis | None = connect(redis_url) if redis_url else None
        self.me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._local: dict[str, dict[str, int]] = {}  # without Redis: counter -> entry -> amount
        self._spending: dict[str, int] = {}  # without Redis
        self._landing: dict[str, asyncio.Task[Any]] = {}  # entry -> its hold, while in flight
        self._tasks: set[asyncio.Task[Any]] = set()
        self._owed: dict[tuple[str, str], Spent | None] = {}  # let-gos Redis refused
        self._unsure: set[str] = set()  # entries whose hold failed (it may never have landed)
        self.dropped = 0
        self._marks: asyncio.Task[None] | None = None
        self._closed = False
        if self.redis is not None:
            self._change = self.redis.register_script(_CHANGE)
            self._alive = self.redis.register_script(_ALIVE)

    @staticmethod
    def new_id() -> str:
        """An entry's id: the caller records it before holding, so that whatever becomes
        of the call it can let go of it."""
        return uuid.uuid4().hex[:16]

    async def hold(
        self, key: str, entry: str, amount: int, spent: Spent | None = None
    ) -> tuple[int, int | None]:
        """Hold ``amount`` in ``key`` under ``entry``; with ``spent``, read that spending
        counter in the same step.  What live gateways hold together (this included), and
        the spending (None: its counter does not exist)."""
        if self.redis is None:
            self._local.setdefault(key, {})[entry] = amount
            return sum(self._local[key].values()), self._spending.get(spent[0]) if spent else None
        task = self._spawn(self._run(key, entry, "hold", amount, spent))
        self._landing[entry] = task

        def landed(task: asyncio.Task[Any]) -> None:
            self._landing.pop(entry, None)
            if task.cancelled() or task.exception() is not None:
                self._unsure.add(entry)  # its let-go gives way first when too many are owed

        task.add_done_callback(landed)
        return await asyncio.shield(task)

    async def read(self, key: str, spent: Spent) -> tuple[int, int | None]:
        """``hold``'s answer without holding anything."""
        if self.redis is None:
            return sum(self._local.get(key, {}).values()), self._spending.get(spent[0])
        return await asyncio.shield(self._spawn(self._run(key, "", "read", 0, spent)))

    async def let_go(self, key: str, entry: str, spent: Spent | None = None) -> None:
        """Let go of ``entry`` (none: nothing); with ``spent``, add its tokens to that
        counter once.  Never fails, and is done even when the caller is cancelled."""
        if self.redis is None:
            if self._local.get(key, {}).pop(entry, None) is not None and spent and spent[0] in self._spending:
                self._spending[spent[0]] += spent[1]
            if not self._local.get(key, True):
                del self._local[key]
            return
        await asyncio.shield(self._spawn(self._let_go(key, entry, spent)))

    async def _let_go(self, key: str, entry: str, spent: Spent | None) -> None:
        landing = self._landing.get(entry)
        if landing is not None:  # its HSET after this HDEL would hold it for good
            await asyncio.wait([landing])
        try:
            await self._run(key, entry, "let_go", 0, spent)
        except Exception as exc:
            if not self._owed:
                log.warning("could not let go in Redis (%s): kept, tried again with the marks", exc)
            self._owe(key, entry, spent)
            return
        self._owed.pop((key, entry), None)
        self._unsure.discard(entry)

    def _owe(self, key: str, entry: str, spent: Spent | None) -> None:
        if (key, entry) not in self._owed and len(self._owed) >= MAX_OWED:
            gives_way = next(((k, e) for k, e in self._owed if e in self._unsure), None)
            if gives_way is None:
                self.dropped += 1
                return
            del self._owed[gives_way]
            self._unsure.discard(gives_way[1])
        self._owed[(key, entry)] = spent

    async def _run(
        self, key: str, entry: str, mode: str, amount: int, spent: Spent | None
    ) -> tuple[int, int | None]:
        self._start_marks()
        keys = [key, f"{key}:entries:{self.me}", f"{key}:gone:{self.me}:{entry}", LIVE]
        args: list[int | str] = [self.me, entry, mode, amount, IDLE_TTL_S, DEAD_AFTER_S, TOMBSTONE_S]
        if spent is not None:
            keys.append(spent[0])
            args += [spent[1], spent[2]]
        total, spending = await self._change(keys=keys, args=args)
        return int(total), None if int(spending) < 0 else int(spending)

    def _spawn(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def set_if_missing(self, key: str, value: int, expire_at: int) -> None:
        if self.redis is None:
            self._spending.setdefault(key, value)
        else:
            await self.redis.set(key, value, nx=True, exat=expire_at)

    def forget(self, stale: Callable[[str], bool]) -> None:
        """Without Redis, drop the spending counters ``stale`` names (Redis expires its own)."""
        for key in [k for k in self._spending if stale(k)]:
            del self._spending[key]

    def _start_marks(self) -> None:
        """The first hold starts the marks (a gateway that holds nothing needs none);
        marks that stopped start again, until the gateway closes."""
        if not self._closed and (self._marks is None or self._marks.done()):
            self._marks = asyncio.create_task(self._marking())

    async def _marking(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_EVERY_S)
            try:
                await self._alive(keys=[LIVE], args=[self.me])
            except Exception as exc:  # Redis away or refusing writes: requests get 503s meanwhile
                log.warning("could not mark this gateway alive in Redis: %s", exc)
                continue
            await self._pay()

    async def _pay(self) -> None:
        """Let-gos owed, ``PAY_AT_ONCE`` at a time; each leaves the list when it is done
        (a close or an error midway keeps the rest)."""
        if self.dropped:
            log.error("let-gos owed to Redis past %d: %d dropped", MAX_OWED, self.dropped)
            self.dropped = 0
        owed = list(self._owed.items())
        for start in range(0, len(owed), PAY_AT_ONCE):
            batch = owed[start : start + PAY_AT_ONCE]
            await asyncio.gather(*(self._let_go(key, entry, spent) for (key, entry), spent in batch))
            if any(k in self._owed for k, _ in batch):
                return  # Redis away again: the next marks go on

    async def close(self) -> None:
        self._closed = True
        if self._marks is not None:
            self._marks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._marks
        if self.redis is None:
            return
        with contextlib.suppress(Exception):
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=10)
            await self._pay()
            await self.redis.zrem(LIVE, self.me)  # its holds go at once
        await self.redis.aclose()
