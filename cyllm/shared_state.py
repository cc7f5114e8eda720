"""The Redis connection every process that shares state opens (coordinators: queue,
workers, cache, jobs; gateways: keys, rate limits), with one policy for Redis going
away: bounded waits, a command retried on a fresh connection when it meets one Redis
closed (a restart), and the outage told to callers as 503, never as a 500."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from cyllm import errors

GONE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


# Connections one process opens to Redis at most.  More commands at once than this wait
# for a connection (up to ``socket_timeout``) instead of failing: redis-py's default pool
# raises ``MaxConnectionsError`` past 100, which a burst of requests reached.
POOL_SIZE = 100


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_SIZE,
            timeout=5,
            decode_responses=False,
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=list(GONE),
        )
    )


def text(value: bytes | str) -> str:
    """A Redis reply as text.  Connections here never decode (``decode_responses=False``),
    so replies are bytes; redis-py's types say ``bytes | str`` whatever the setting."""
    return value.decode() if isinstance(value, bytes) else value


def members(reply: Sequence[object]) -> list[bytes]:
    """The members a ZRANGE-like command returned without scores.  redis-py types the
    reply for every option at once (pairs with scores, nested lists, ``str`` when
    decoding); on these connections, without scores, it is a list of bytes."""
    return cast("list[bytes]", reply)


def unreachable(exc: BaseException) -> errors.CyllmError | None:
    """Redis gone (down, restarting, still loading its data): Unavailable; else None."""
    if isinstance(exc, GONE):
        return errors.Unavailable(f"the shared state (Redis) is unreachable: {exc}")
    return None
