"""The prompt cache in Redis, shared by every coordinator on it.

Keys (prefix ``cyllm:``)::

    c:<sha256>  STR    cached response (TTL);  c:lru ZSET last use;  c:hits, c:misses
"""

from __future__ import annotations

import redis.asyncio as aioredis

from cyllm.coordinator.cache import CachedResponse, PromptCache, decode, encode
from cyllm.coordinator.redis_backend import P

_CACHE_GET = """
-- KEYS: c:<key>, c:hits, c:misses, c:lru   ARGV: key
local v = redis.call('GET', KEYS[1])
if v then
  local t = redis.call('TIME')
  redis.call('INCR', KEYS[2])
  redis.call('ZADD', KEYS[4], t[1] .. '.' .. string.format('%06d', tonumber(t[2])), ARGV[1])
else
  redis.call('INCR', KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
end
return v
"""

_CACHE_PUT = """
-- KEYS: c:<key>, c:lru   ARGV: key, value, ttl_ms, max_entries, prefix
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], t[1] .. '.' .. string.format('%06d', tonumber(t[2])), ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], extra)
  for i = 1, #old, 2 do redis.call('DEL', ARGV[5] .. 'c:' .. old[i]) end
end
return 1
"""


class RedisPromptCache(PromptCache):
    """Entries expire by TTL; past ``max_entries`` the least recently used go first.  A
    lookup and a store are one round trip each."""

    def __init__(self, client: aioredis.Redis, ttl_s: float, max_entries: int) -> None:
        self.r = self.redis = client
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._get = client.register_script(_CACHE_GET)
        self._put = client.register_script(_CACHE_PUT)

    async def get(self, key: str) -> CachedResponse | None:
        raw = await self._get(keys=[P + f"c:{key}", P + "c:hits", P + "c:misses", P + "c:lru"], args=[key])
        return decode(raw) if raw is not None else None

    async def put(self, key: str, value: CachedResponse) -> None:
        if not self.enabled:
            return
        await self._put(keys=self._put_keys(key), args=self._put_args(key, value))

    def queue_put(self, pipe: aioredis.client.Pipeline, key: str, value: CachedResponse) -> None:
        """The store, queued on ``pipe`` by its script's hash (sent by its owner: the
        scheduler's release, so that a finished request costs one round trip for both;
        a Redis that has lost the script answers NOSCRIPT and the owner stores again)."""
        keys = self._put_keys(key)
        pipe.evalsha(self._put.sha, len(keys), *keys, *self._put_args(key, value))

    def _put_keys(self, key: str) -> list[str]:
        return [P + f"c:{key}", P + "c:lru"]

    def _put_args(self, key: str, value: CachedResponse) -> list:
        return [key, encode(value), int(self.ttl_s * 1000), self.max_entries, P]

    async def hits(self) -> int:
        return int(await self.r.get(P + "c:hits") or 0)

    async def misses(self) -> int:
        return int(await self.r.get(P + "c:misses") or 0)

    async def size(self) -> int:
        return int(await self.r.zcard(P + "c:lru"))
