"""The coordinator process."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cyllm.coordinator.cache import InMemoryPromptCache
from cyllm.coordinator.dispatcher import Dispatcher
from cyllm.coordinator.queue import InMemoryTaskQueue
from cyllm.coordinator.registry import WorkerRegistry
from cyllm.coordinator.service import CoordinatorService
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.protocol import rpc
from cyllm.runtime import stop_event

log = logging.getLogger("cyllm.coordinator")


def build_service(settings: CoordinatorSettings) -> CoordinatorService:
    queue = InMemoryTaskQueue(settings.queue_max_size, settings.retry_after_s)
    cache = InMemoryPromptCache(settings.cache_ttl_s, settings.cache_max_entries)
    registry = WorkerRegistry(settings.heartbeat_timeout_s)
    dispatcher = Dispatcher(queue, registry, settings.queue_timeout_s)
    return CoordinatorService(queue, cache, registry, dispatcher, settings.heartbeat_interval_s)


async def serve(settings: CoordinatorSettings) -> None:
    service = build_service(settings)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    rpc.add_CoordinatorServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("coordinator listening on %s:%d", settings.host, port)
    await stop_event().wait()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace=5.0)
    await service.registry.close()
