"""The coordinator process."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cyllm.coordinator.cache import InMemoryPromptCache, PromptCache
from cyllm.coordinator.datasets import DatasetPolicy
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.idempotency import (
    Idempotency,
    IdempotencyStore,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
)
from cyllm.coordinator.jobs import MemoryJobStore
from cyllm.coordinator.metrics import CoordinatorMetrics
from cyllm.coordinator.redis_jobs import RedisJobStore
from cyllm.coordinator.pool import HealthRules
from cyllm.coordinator.routing import Router
from cyllm.coordinator.scheduler import MemoryScheduler, Scheduler
from cyllm.coordinator.service import CoordinatorService
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import rpc
from cyllm.protocol.plane import Plane, load_plane
from cyllm.protocol.server import create_server
from cyllm.runtime import stop_event
from cyllm.shared_state import unreachable
from cyllm.telemetry import serve_metrics

log = logging.getLogger("cyllm.coordinator")
STOP_LIMIT_S = 20.0


def build_backends(s: CoordinatorSettings,
                   coordinator_id: str) -> tuple[Scheduler, PromptCache, IdempotencyStore]:
    rules = HealthRules(s.heartbeat_timeout_s, s.progress_timeout_s)
    router = Router(s.routing)
    limits = {"queue_timeout_s": s.queue_timeout_s, "max_size": s.queue_max_size,
              "retry_after_s": s.retry_after_s}
    if s.redis_url:
        from cyllm.coordinator.redis_backend import RedisScheduler
        from cyllm.coordinator.redis_cache import RedisPromptCache
        from cyllm.shared_state import connect

        client = connect(s.redis_url)
        return (
            RedisScheduler(client, coordinator_id, rules, router, lease_s=s.lease_s, **limits),
            RedisPromptCache(client, s.cache_ttl_s, s.cache_max_entries),
            RedisIdempotencyStore(client),
        )
    return (MemoryScheduler(rules, router, **limits),
            InMemoryPromptCache(s.cache_ttl_s, s.cache_max_entries), MemoryIdempotencyStore())


class CoordinatorServer:
    def __init__(self, settings: CoordinatorSettings, plane: Plane | None = None) -> None:
        self.settings = settings
        self.plane = plane or load_plane()
        self._server = create_server(self.plane, translate=unreachable)
        self._health = health.aio.HealthServicer()
        self.port = self.plane.bind(self._server, f"{settings.host}:{settings.port}")
        self.coordinator_id = settings.coordinator_id or f"{socket.gethostname()}-{self.port}-{os.getpid()}"
        self.scheduler, self.cache, idempotency = build_backends(settings, self.coordinator_id)
        self.metrics = CoordinatorMetrics()
        self._metrics_server = None
        self._refresher: asyncio.Task[None] | None = None
        self.metrics_port = 0
        self.service = CoordinatorService(
            self.coordinator_id, self.scheduler, self.cache, self.metrics,
            heartbeat_interval_s=settings.heartbeat_interval_s,
            progress_timeout_s=settings.progress_timeout_s,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown_s=settings.breaker_cooldown_s,
            lease_s=settings.lease_s,
            attempts=settings.generation_attempts,
            idempotency=Idempotency(idempotency, self.coordinator_id, settings.idempotency_ttl_s,
                                    settings.lease_s),
            plane=self.plane,
        )
        store = RedisJobStore(settings.redis_url) if settings.redis_url else MemoryJobStore()
        datasets = DatasetPolicy(tuple(settings.datasets_dirs), settings.datasets_any_path_for_admins,
                                 settings.dataset_limits(), settings.dataset_read_memory_bytes,
                                 settings.dataset_read_timeout_s)
        self.service.files = FileStore(store, settings.files_dir, settings.files_max_bytes, datasets)
        self.service.training = TrainingManager(
            store, self.service.files, self.scheduler, self.service.workers, self.coordinator_id,
            lease_s=settings.lease_s, max_attempts=settings.training_max_attempts, datasets=datasets,
            max_jobs_per_tenant=settings.training_max_jobs_per_tenant,
            max_steps=settings.training_max_steps, max_time_s=settings.training_max_time_s)
        self.scheduler.owners_from(store.model_owners)
        rpc.add_CoordinatorServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)

    async def start(self) -> int:
        await self.scheduler.start()
        await self.service.training.start()
        self._metrics_server, self.metrics_port = serve_metrics(
            self.metrics.registry, self.settings.host, self.settings.metrics_port)
        self._refresher = asyncio.create_task(self.metrics.refresh_forever(self.scheduler, self.cache))
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("coordinator %s (%s backend) listening on %s:%d", self.coordinator_id,
                 self.scheduler.backend, self.settings.host, self.port)
        return self.port

    async def stop(self) -> None:
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace=5.0)
        if self._refresher is not None:
            self._refresher.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.service.training.close()
        await self.service.close()
        await self.scheduler.close()


async def serve(settings: CoordinatorSettings, plane: Plane) -> None:
    server = CoordinatorServer(settings, plane)
    await server.start()
    await stop_event().wait()
    log.info("stopping coordinator %s", server.coordinator_id)
    # A stop must end: if it has not after STOP_LIMIT_S, every thread's stack goes to
    # stderr (the log) and the process exits.
    faulthandler.dump_traceback_later(STOP_LIMIT_S, exit=True)
    await server.stop()
    log.info("coordinator %s stopped", server.coordinator_id)
