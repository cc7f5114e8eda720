"""Recent traffic through this gateway, for the console's charts: generated tokens per
second and the median time to first token, in 10-second buckets over the last 10
minutes.  Bounded memory (60 buckets, at most ``MAX_SAMPLES`` TTFTs each); per gateway
process (Prometheus' ``/metrics`` is the cluster-wide, long-term view)."""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

BUCKET_S = 10
KEEP = 60
MAX_SAMPLES = 1000


@dataclass
class _Bucket:
    start: int
    tokens: int = 0
    requests: int = 0
    ttfts: list[float] = field(default_factory=list)


class TrafficStats:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: deque[_Bucket] = deque(maxlen=KEEP)

    def _current(self) -> _Bucket:
        start = int(self._clock()) // BUCKET_S * BUCKET_S
        if not self._buckets or self._buckets[-1].start != start:
            self._buckets.append(_Bucket(start))
        return self._buckets[-1]

    def first_token(self, seconds: float) -> None:
        bucket = self._current()
        if len(bucket.ttfts) < MAX_SAMPLES:
            bucket.ttfts.append(seconds)

    def finished(self, completion_tokens: int) -> None:
        bucket = self._current()
        bucket.tokens += completion_tokens
        bucket.requests += 1

    def snapshot(self) -> list[dict[str, float | int | None]]:
        """Every bucket of the window, oldest first, empty ones included (zeros; no TTFT)."""
        now = int(self._clock()) // BUCKET_S * BUCKET_S
        seen = {b.start: b for b in self._buckets}
        out = []
        for start in range(now - (KEEP - 1) * BUCKET_S, now + 1, BUCKET_S):
            b = seen.get(start, _Bucket(start))
            out.append(
                {
                    "start": start,
                    "tokensPerSecond": round(b.tokens / BUCKET_S, 2),
                    "requests": b.requests,
                    "ttftP50Ms": round(statistics.median(b.ttfts) * 1000, 1) if b.ttfts else None,
                }
            )
        return out
