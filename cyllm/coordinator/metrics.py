"""The coordinator's Prometheus metrics (names as in docs/design.md)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cyllm.coordinator.cache import PromptCache
from cyllm.coordinator.scheduler import Scheduler
from cyllm.telemetry import LATENCY_BUCKETS

log = logging.getLogger(__name__)


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "coordinator_inference_requests",
            "Generation requests by model and outcome (ok, cached, or an error code)",
            ["model", "outcome"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "coordinator_queue_wait_seconds",
            "Seconds a request waited for a worker slot",
            ["model"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.retries = Counter(
            "coordinator_worker_retries",
            "Generations moved to another worker after theirs failed, by "
            "whether tokens had been sent (resumed) or not (retried)",
            ["kind"],
            registry=r,
        )
        self.cache_hit_rate = Gauge(
            "coordinator_cache_hit_rate", "Prompt cache hits / lookups (whole cluster on Redis)", registry=r
        )
        self.queue_depth = Gauge("coordinator_queue_depth", "Requests waiting for a worker slot", registry=r)
        self.queue_capacity = Gauge("coordinator_queue_capacity", "Queue bound", registry=r)
        self.worker_healthy = Gauge("coordinator_worker_healthy", "1 healthy, 0 not", ["worker"], registry=r)
        self.worker_outstanding = Gauge(
            "coordinator_worker_outstanding", "Generations in flight per worker", ["worker"], registry=r
        )

    async def refresh_forever(self, scheduler: Scheduler, cache: PromptCache, every_s: float = 2.0) -> None:
        """Gauges that need the (possibly shared, async) state are refreshed here."""
        while True:
            try:
                await self.refresh(scheduler, cache)
            except Exception:  # a Redis hiccup must not stop the loop
                log.exception("metrics refresh failed")
            await asyncio.sleep(every_s)

    async def refresh(self, scheduler: Scheduler, cache: PromptCache) -> None:
        hits, misses = await cache.hits(), await cache.misses()
        self.cache_hit_rate.set(hits / (hits + misses) if hits + misses else 0.0)
        self.queue_depth.set(await scheduler.queue_depth())
        self.queue_capacity.set(scheduler.queue_capacity)
        self.worker_healthy.clear()
        self.worker_outstanding.clear()
        for view in await scheduler.workers():
            self.worker_healthy.labels(view.record.worker_id).set(1 if view.healthy else 0)
            self.worker_outstanding.labels(view.record.worker_id).set(view.record.outstanding)
