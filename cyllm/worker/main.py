"""The worker process: load the engines, serve gRPC, register with coordinators."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cyllm.protocol import pb, rpc
from cyllm.protocol.plane import Plane, load_plane
from cyllm.protocol.server import create_server
from cyllm.runtime import advertised, stop_event
from cyllm.telemetry import serve_metrics
from cyllm.worker.devices import detect_accelerator
from cyllm.worker.engines.factory import is_test_double
from cyllm.worker.engines.types import EngineHealth
from cyllm.worker.metrics import WorkerMetrics
from cyllm.worker.models import ModelManager
from cyllm.worker.registration import Registrar
from cyllm.worker.service import WorkerService
from cyllm.worker.settings import WorkerSettings
from cyllm.worker.training.jobs import WorkerTraining

log = logging.getLogger("cyllm.worker")


class WorkerServer:
    """Engines + gRPC server + registration; ``start`` then ``stop`` (a graceful drain)."""

    def __init__(self, settings: WorkerSettings, plane: Plane | None = None) -> None:
        self.settings = settings
        self.plane = plane or load_plane()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._registrars: list[Registrar] = []
        self._registering: list[asyncio.Task[None]] = []
        self._metrics_server: WSGIServer | None = None
        self.models_changed = asyncio.Event()
        self.models_version = 0

    @property
    def engines(self):
        return self.models.engines()

    async def start(self) -> int:
        s = self.settings
        real = not all(is_test_double(m) for m in s.models)
        if real:
            import torch

            torch.set_num_threads(s.torch_threads or os.cpu_count() or 1)
        accelerator = detect_accelerator() if real else "cpu"
        self.models = ModelManager(s, accelerator, self._models_changed)
        self.training = WorkerTraining(s, lambda: self.models.catalog, accelerator, self._models_changed)
        await self.models.start()

        self._server = create_server(self.plane)
        self.port = self.plane.bind(self._server, f"{s.host}:{s.port}")
        self.worker_id = s.worker_id or advertised(s.host, self.port).replace(":", "-")
        self.metrics = WorkerMetrics(self.models, self.worker_id)
        self._metrics_server, self.metrics_port = serve_metrics(self.metrics.registry, s.host, s.metrics_port)
        self.service = WorkerService(
            self.worker_id, self.models, self.metrics, lambda: self.info, self.training
        )
        rpc.add_WorkerServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        await self._server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("worker %s listening on %s:%d", self.worker_id, s.host, self.port)
        self._registrars = [Registrar(a, self, self.plane) for a in s.coordinators]
        self._registering = [asyncio.create_task(r.run()) for r in self._registrars]
        self._registering.append(asyncio.create_task(self._unload_idle_forever()))
        return self.port

    async def _unload_idle_forever(self, every_s: float = 5.0) -> None:
        """Models unused past their keep-alive are unloaded (the coordinators are told;
        the next request for one loads it again)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.models.unload_idle()
            except Exception:  # one bad unload must not end the sweeps
                log.exception("unloading idle models failed")

    async def stop(self) -> None:
        """Graceful drain: no new work, finish what is running (bounded), then leave."""
        log.info("draining worker %s", self.worker_id)
        self.service.draining = True
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        for task in self._registering:
            task.cancel()
        await asyncio.gather(*(r.deregister() for r in self._registrars))
        deadline = time.monotonic() + self.settings.drain_timeout_s
        # A training job is not waited for: its call ends with the server, the coordinator
        # re-queues it and it resumes from its last checkpoint elsewhere.
        while time.monotonic() < deadline and any(e.health().running for e in self.engines.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self.service.sessions.end()  # the coordinators' long-lived calls end here
        if self._server is not None:
            await self._server.stop(grace=1.0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        await self.models.close()

    @property
    def info(self) -> pb.WorkerInfo:
        """What registration tells the coordinators (rebuilt after each load/unload)."""
        s, m = self.settings, self.models
        cards = [e.card for e in m.loaded.values()]
        return pb.WorkerInfo(
            worker_id=self.worker_id,
            address=s.advertise_address or advertised(s.host, self.port),
            models=m.served(),
            capacity=sum(c.max_batch_size for c in cards),
            device=",".join(sorted({c.device for c in cards})) or m.budget.device_type,
            weight=s.weight,
            available=m.available(),
            memory_budget_bytes=m.budget.limit,
            memory_used_bytes=m.budget.used_bytes,
            trains=not self.training.unavailable,
            training_job=self.training.current,
            training_shares_device=s.training_shares_device,
            training_devices=self.training.devices,
        )

    def healths(self) -> list[EngineHealth]:
        return [e.health() for e in self.engines.values()]

    def _models_changed(self) -> None:
        self.models_version += 1
        self.models_changed.set()  # wakes every registrar; later waits use a fresh event
        self.models_changed = asyncio.Event()


async def serve(settings: WorkerSettings, plane: Plane) -> None:
    worker = WorkerServer(settings, plane)
    await worker.start()
    await stop_event().wait()
    await worker.stop()
