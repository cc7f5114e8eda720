"""The coordinator process."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cyllm.coordinator.cache import InMemoryPromptCache, PromptCache
from cyllm.coordinator.datasets import DatasetPolicy
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.idempotency import Idempotency, IdempotencyStore, RedisIdempotencyStore
from cyllm.coordinator.jobs import JobStore
from cyllm.coordinator.ledger import Ledger, RedisLedger, SqliteLedger
from cyllm.coordinator.loading import Loader
from cyllm.coordinator.metrics import CoordinatorMetrics
from cyllm.coordinator.pool import HealthRules
from cyllm.coordinator.registry import RedisRegistry, Registry, SqliteRegistry
from cyllm.coordinator.routing import Router
from cyllm.coordinator.scheduler import MemoryScheduler, Scheduler
from cyllm.coordinator.services.batches import BatchService
from cyllm.coordinator.services.inference import InferenceService
from cyllm.coordinator.services.models import ModelsService
from cyllm.coordinator.services.pool import WorkerPoolService
from cyllm.coordinator.services.responses import ResponsesService
from cyllm.coordinator.services.training import FilesService, TrainingService
from cyllm.coordinator.services.usage import UsageService
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.coordinator.sqlite import Database
from cyllm.coordinator.sqlite_jobs import SqliteIdempotencyStore, SqliteJobStore
from cyllm.coordinator.training import TrainingManager
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol import rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.plane import Plane, load_plane
from cyllm.protocol.server import create_server
from cyllm.runtime import stop_event
from cyllm.shared_state import unreachable
from cyllm.telemetry import serve_metrics

log = logging.getLogger("cyllm.coordinator")
STOP_LIMIT_S = 20.0


@dataclass
class Backends:
    """Where a coordinator keeps what it knows: what users made (jobs, files' records,
    models and aliases, idempotency records) in an SQLite file, the queue and the cache
    in this process — or all of it in Redis, shared with every other coordinator."""

    scheduler: Scheduler
    cache: PromptCache
    idempotency: IdempotencyStore
    registry: Registry
    jobs: JobStore
    ledger: Ledger
    database: Database | None = None  # the embedded default's state file

    @property
    def described(self) -> str:
        if self.database is None:
            return "state in Redis"
        return f"queue in memory, state in {self.database.path}"

    async def start(self) -> None:
        if self.database is not None:
            await self.database.start()
        await self.scheduler.start()

    async def close(self) -> None:
        await self.scheduler.close()
        if self.database is not None:
            await self.database.close()


def build_backends(
    s: CoordinatorSettings, coordinator_id: str, clock: Callable[[], float] = time.monotonic
) -> Backends:
    """``clock``: the in-memory scheduler's and cache's (Redis's state runs on Redis's
    clock, the state file's on the wall clock)."""
    rules = HealthRules(s.heartbeat_timeout_s, s.progress_timeout_s)
    router = Router(s.routing)
    if s.redis_url:
        from cyllm.coordinator.redis_backend import RedisScheduler
        from cyllm.coordinator.redis_cache import RedisPromptCache
        from cyllm.coordinator.redis_jobs import RedisJobStore
        from cyllm.shared_state import connect

        client = connect(s.redis_url)
        shared = RedisRegistry(client)
        return Backends(
            RedisScheduler(
                client,
                coordinator_id,
                rules,
                router,
                shared,
                lease_s=s.lease_s,
                queue_timeout_s=s.queue_timeout_s,
                max_size=s.queue_max_size,
                retry_after_s=s.retry_after_s,
            ),
            RedisPromptCache(client, s.cache_ttl_s, s.cache_max_entries),
            RedisIdempotencyStore(client),
            shared,
            RedisJobStore(s.redis_url),
            RedisLedger(client, s.usage_retention_days),
        )
    db = Database(s.state_db)
    registry = SqliteRegistry(db)
    return Backends(
        MemoryScheduler(
            rules,
            router,
            registry,
            clock=clock,
            queue_timeout_s=s.queue_timeout_s,
            max_size=s.queue_max_size,
            retry_after_s=s.retry_after_s,
        ),
        InMemoryPromptCache(s.cache_ttl_s, s.cache_max_entries, clock=clock),
        SqliteIdempotencyStore(db),
        registry,
        SqliteJobStore(db),
        SqliteLedger(db, s.usage_retention_days),
        db,
    )


@dataclass
class Services:
    """The coordinator's servicers (``services/``), one per service of the contract."""

    inference: InferenceService
    models: ModelsService
    training: TrainingService
    files: FilesService
    responses: ResponsesService
    batches: BatchService
    usage: UsageService
    pool: WorkerPoolService

    def add_to(self, server: grpc.aio.Server) -> None:
        rpc.add_InferenceServicer_to_server(self.inference, server)
        rpc.add_ModelsServicer_to_server(self.models, server)
        rpc.add_TrainingServicer_to_server(self.training, server)
        rpc.add_FilesServicer_to_server(self.files, server)
        rpc.add_ResponsesServicer_to_server(self.responses, server)
        rpc.add_BatchesServicer_to_server(self.batches, server)
        rpc.add_UsageServicer_to_server(self.usage, server)
        rpc.add_WorkerPoolServicer_to_server(self.pool, server)


class CoordinatorServer:
    def __init__(self, settings: CoordinatorSettings, plane: Plane | None = None) -> None:
        s = self.settings = settings
        self.plane = plane or load_plane()
        self._server = create_server(self.plane, translate=unreachable)
        self._health = health.aio.HealthServicer()
        self.port = self.plane.bind(self._server, f"{s.host}:{s.port}")
        self.coordinator_id = s.coordinator_id or f"{socket.gethostname()}-{self.port}-{os.getpid()}"
        backends = self.backends = build_backends(s, self.coordinator_id)
        self.scheduler, self.cache = backends.scheduler, backends.cache
        self.metrics = CoordinatorMetrics()
        self._metrics_server: WSGIServer | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.metrics_port = 0
        self.workers = WorkerClients(self.plane)
        breakers = CircuitBreakers(s.breaker_failures, s.breaker_cooldown_s)
        datasets = DatasetPolicy(
            tuple(s.datasets_dirs),
            s.datasets_any_path_for_admins,
            s.dataset_limits(),
            s.dataset_read_memory_bytes,
            s.dataset_read_timeout_s,
            tuple(s.dataset_formatters),
            s.hub_datasets_dir or s.files_dir.parent / "hub-datasets" if s.hub_datasets_allowed else None,
            tuple(s.hub_datasets_allowed),
        )
        files = FileStore(backends.jobs, s.files_dir, s.files_max_bytes, datasets, s.batch_max_requests)
        self.training = TrainingManager(
            backends.jobs,
            files,
            self.scheduler,
            self.workers,
            backends.registry,
            self.coordinator_id,
            lease_s=s.lease_s,
            max_attempts=s.training_max_attempts,
            datasets=datasets,
            max_jobs_per_tenant=s.training_max_jobs_per_tenant,
            max_steps=s.training_max_steps,
            max_time_s=s.training_max_time_s,
            ledger=backends.ledger,
        )
        models = ModelsService(
            self.coordinator_id,
            self.scheduler,
            self.cache,
            backends.registry,
            self.workers,
            breakers,
            private=[s.files_dir, s.state_db],  # never exported as (or inside) a model's folder
        )
        self.services = Services(
            inference=InferenceService(
                self.scheduler,
                self.cache,
                self.workers,
                breakers,
                self.metrics,
                Idempotency(backends.idempotency, self.coordinator_id, s.idempotency_ttl_s, s.lease_s),
                progress_timeout_s=s.progress_timeout_s,
                lease_s=s.lease_s,
                attempts=s.generation_attempts,
                owned_model_names=s.metrics_owned_model_names,
                registry=backends.registry,
                loader=Loader(self.scheduler, backends.registry, models.admin),
            ),
            models=models,
            training=TrainingService(self.training, models.visible),
            files=FilesService(files),
            responses=ResponsesService(backends.jobs, s.responses_ttl_s, s.responses_max_per_tenant),
            batches=BatchService(
                backends.jobs,
                files,
                s.batch_max_open_per_tenant,
                s.batch_max_output_bytes,
                self.coordinator_id,
            ),
            usage=UsageService(backends.ledger),
            pool=WorkerPoolService(self.scheduler, s.heartbeat_interval_s, self.plane),
        )
        self.services.add_to(self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)

    async def start(self) -> int:
        await self.backends.start()
        await self.training.start()
        self._metrics_server, self.metrics_port = serve_metrics(
            self.metrics.registry, self.settings.host, self.settings.metrics_port
        )
        self._refresher = asyncio.create_task(self.metrics.refresh_forever(self.scheduler, self.cache))
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "coordinator %s (%s) listening on %s:%d",
            self.coordinator_id,
            self.backends.described,
            self.settings.host,
            self.port,
        )
        return self.port

    async def stop(self) -> None:
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace=5.0)
        if self._refresher is not None:
            self._refresher.cancel()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.training.close()
        await self.services.batches.close()
        await self.workers.close()
        await self.backends.close()


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
