"""Per-caller limits: requests per minute, tokens per minute and generations at once.

The counters live in the ``limits`` library's storage: Redis when ``redis_url`` is set
(its moving-window Lua scripts are atomic, so several gateways enforce one limit
together rather than one each), memory otherwise.  Over a limit: 429 with
``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers.  Tokens are counted when a
generation ends (prompt + completion); a caller over its token budget is refused new
requests until the window frees up.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from cyllm import errors
from cyllm.gateway.auth import Identity
from cyllm.gateway.settings import GatewaySettings


@dataclass
class Admission:
    subject: str
    headers: dict[str, str] = field(default_factory=dict)
    holds_slot: bool = False


class RateLimiter:
    def __init__(self, settings: GatewaySettings) -> None:
        self.rpm = RateLimitItemPerMinute(settings.rate_limit_rpm) if settings.rate_limit_rpm else None
        self.tpm = RateLimitItemPerMinute(settings.rate_limit_tpm) if settings.rate_limit_tpm else None
        self.concurrency = settings.rate_limit_concurrency
        if settings.redis_url:
            storage = RedisStorage("async+" + settings.redis_url, implementation="redispy",
                                   key_prefix="cyllm:limits")
            self._redis = aioredis.from_url(settings.redis_url)
        else:
            storage = MemoryStorage()
            self._redis = None
        self.window = MovingWindowRateLimiter(storage)
        self._running: dict[str, int] = {}

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)

    async def admit(self, identity: Identity) -> Admission:
        adm = Admission(identity.subject)
        if not self.active:
            return adm
        if self.tpm is not None:
            stats = await self.window.get_window_stats(self.tpm, "tpm", adm.subject)
            adm.headers |= _headers("tokens", self.tpm.amount, stats.remaining, stats.reset_time)
            if stats.remaining <= 0:
                raise self._refuse("tokens per minute", stats.reset_time, adm.headers)
        if self.rpm is not None:
            allowed = await self.window.hit(self.rpm, "rpm", adm.subject)
            stats = await self.window.get_window_stats(self.rpm, "rpm", adm.subject)
            adm.headers |= _headers("requests", self.rpm.amount, stats.remaining, stats.reset_time)
            if not allowed:
                raise self._refuse("requests per minute", stats.reset_time, adm.headers)
        if self.concurrency is not None:
            if await self._incr(adm.subject) > self.concurrency:
                await self._decr(adm.subject)
                raise errors.RateLimited(
                    f"more than {self.concurrency} generations at once for this caller",
                    retry_after=1, headers=adm.headers)
            adm.holds_slot = True
        return adm

    async def finish(self, adm: Admission, tokens: int) -> None:
        if adm.holds_slot:
            adm.holds_slot = False
            await self._decr(adm.subject)
        if self.tpm is not None and tokens > 0:
            stats = await self.window.get_window_stats(self.tpm, "tpm", adm.subject)
            if stats.remaining > 0:
                await self.window.hit(self.tpm, "tpm", adm.subject, cost=min(tokens, stats.remaining))

    def _refuse(self, what: str, reset: float, headers: dict[str, str]) -> errors.RateLimited:
        wait = max(1.0, reset - time.time())
        return errors.RateLimited(f"rate limit exceeded: {what}; retry in {math.ceil(wait)}s",
                                  retry_after=wait, headers=headers)

    async def _incr(self, subject: str) -> int:
        if self._redis is not None:
            key = f"cyllm:limits:running:{subject}"
            n = await self._redis.incr(key)
            await self._redis.expire(key, 3600)  # a crashed gateway's slots do not last forever
            return int(n)
        self._running[subject] = self._running.get(subject, 0) + 1
        return self._running[subject]

    async def _decr(self, subject: str) -> None:
        if self._redis is not None:
            await self._redis.decr(f"cyllm:limits:running:{subject}")
        else:
            self._running[subject] = max(0, self._running.get(subject, 1) - 1)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{max(0.0, reset - time.time()):.0f}s",
    }
