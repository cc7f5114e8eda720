"""The worker process: load the engines, serve gRPC, register with coordinators."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cyllm.protocol import pb, rpc
from cyllm.runtime import advertised, stop_event
from cyllm.worker.convert import card_to_proto
from cyllm.worker.engines.base import AbstractEngine, ModelCard
from cyllm.worker.engines.factory import create_engine
from cyllm.telemetry import serve_metrics
from cyllm.worker.metrics import WorkerMetrics
from cyllm.worker.service import WorkerService
from cyllm.worker.settings import WorkerSettings

log = logging.getLogger("cyllm.worker")


class WorkerServer:
    """Engines + gRPC server + registration; ``start`` then ``stop`` (a graceful drain)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.engines: dict[str, AbstractEngine] = {}
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._registrars: list[asyncio.Task[None]] = []
        self._metrics_server = None

    async def start(self) -> int:
        s = self.settings
        if any(m.engine != "fake" for m in s.models):
            import torch

            torch.set_num_threads(s.torch_threads or os.cpu_count() or 1)
        cards: list[ModelCard] = []
        for spec in s.models:
            log.info("loading model %s (engine %s)", spec.id, spec.engine)
            engine = await asyncio.to_thread(create_engine, spec, s.cache_dir)
            cards.append(await engine.load())
            self.engines[spec.id] = engine
            log.info("model %s ready on %s", spec.id, cards[-1].device)

        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.port = self._server.add_insecure_port(f"{s.host}:{s.port}")
        self.worker_id = s.worker_id or advertised(s.host, self.port).replace(":", "-")
        self.metrics = WorkerMetrics(self.engines, self.worker_id)
        self._metrics_server, self.metrics_port = serve_metrics(self.metrics.registry, s.host, s.metrics_port)
        self.service = WorkerService(self.worker_id, self.engines, self.metrics)
        rpc.add_WorkerServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.info = pb.WorkerInfo(
            worker_id=self.worker_id,
            address=s.advertise_address or advertised(s.host, self.port),
            models=[card_to_proto(c) for c in cards],
            capacity=sum(c.max_batch_size for c in cards),
            device=",".join(sorted({c.device for c in cards})),
            weight=s.weight,
        )
        log.info("worker %s listening on %s:%d", self.worker_id, s.host, self.port)
        self._registrars = [asyncio.create_task(self._keep_registered(a)) for a in s.coordinators]
        return self.port

    async def stop(self) -> None:
        """Graceful drain: no new work, finish what is running (bounded), then leave."""
        log.info("draining worker %s", self.worker_id)
        self.service.draining = True
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in self._registrars:
            task.cancel()
        await asyncio.gather(*(self._deregister(a) for a in self.settings.coordinators))
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while time.monotonic() < deadline and any(e.health().running for e in self.engines.values()):
            await asyncio.sleep(0.1)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        for engine in self.engines.values():
            await engine.close()

    async def _keep_registered(self, address: str) -> None:
        """Register, then heartbeat (running count + progress); register again when forgotten."""
        async with grpc.aio.insecure_channel(address) as channel:
            stub = rpc.CoordinatorStub(channel)
            interval, registered = 1.0, False
            while True:
                try:
                    if not registered:
                        reply = await stub.RegisterWorker(pb.RegisterWorkerRequest(worker=self.info), timeout=5)
                        interval, registered = reply.heartbeat_interval_s or 1.0, True
                        log.info("registered with coordinator %s", address)
                    healths = [e.health() for e in self.engines.values()]
                    beat = await stub.Heartbeat(
                        pb.HeartbeatRequest(
                            worker_id=self.worker_id,
                            running=sum(h.running + h.waiting for h in healths),
                            tokens_generated=sum(h.tokens_generated for h in healths),
                        ),
                        timeout=5,
                    )
                    registered = beat.known
                except grpc.aio.AioRpcError as exc:
                    if registered:
                        log.warning("coordinator %s unreachable: %s", address, exc.code().name)
                    registered = False
                await asyncio.sleep(interval)

    async def _deregister(self, address: str) -> None:
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await rpc.CoordinatorStub(channel).DeregisterWorker(
                    pb.DeregisterWorkerRequest(worker_id=self.worker_id), timeout=3
                )
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister from %s: %s", address, exc.code().name)


async def serve(settings: WorkerSettings) -> None:
    worker = WorkerServer(settings)
    await worker.start()
    await stop_event().wait()
    await worker.stop()
