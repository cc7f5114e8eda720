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


class CoordinatorServer:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.service = build_service(settings)
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._health = health.aio.HealthServicer()
        rpc.add_CoordinatorServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = 0

    async def start(self) -> int:
        self.port = self._server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("coordinator listening on %s:%d", self.settings.host, self.port)
        return self.port

    async def stop(self) -> None:
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace=5.0)
        await self.service.registry.close()


async def serve(settings: CoordinatorSettings) -> None:
    server = CoordinatorServer(settings)
    await server.start()
    await stop_event().wait()
    await server.stop()
