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
from cyllm.worker.service import WorkerService
from cyllm.worker.settings import WorkerSettings

log = logging.getLogger("cyllm.worker")


async def serve(settings: WorkerSettings) -> None:
    if any(m.engine != "fake" for m in settings.models):
        import torch

        torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)
    engines: dict[str, AbstractEngine] = {}
    cards: list[ModelCard] = []
    for spec in settings.models:
        log.info("loading model %s (engine %s)", spec.id, spec.engine)
        engine = await asyncio.to_thread(create_engine, spec, settings.cache_dir)
        cards.append(await engine.load())
        engines[spec.id] = engine
        log.info("model %s ready on %s", spec.id, cards[-1].device)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    worker_id = settings.worker_id or advertised(settings.host, port).replace(":", "-")
    service = WorkerService(worker_id, engines)
    rpc.add_WorkerServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    info = pb.WorkerInfo(
        worker_id=worker_id,
        address=settings.advertise_address or advertised(settings.host, port),
        models=[card_to_proto(c) for c in cards],
        capacity=sum(c.max_batch_size for c in cards),
        device=",".join(sorted({c.device for c in cards})),
    )
    log.info("worker %s listening on %s:%d", worker_id, settings.host, port)
    registrars = [asyncio.create_task(_keep_registered(addr, info, engines)) for addr in settings.coordinators]

    await stop_event().wait()
    # Graceful drain: no new work, finish what is running (bounded), then leave.
    log.info("draining worker %s", worker_id)
    service.draining = True
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    for task in registrars:
        task.cancel()
    await asyncio.gather(*(_deregister(a, worker_id) for a in settings.coordinators))
    deadline = time.monotonic() + settings.drain_timeout_s
    while time.monotonic() < deadline and any(e.health().running for e in engines.values()):
        await asyncio.sleep(0.1)
    await server.stop(grace=1.0)
    for engine in engines.values():
        await engine.close()


async def _keep_registered(
    address: str, info: pb.WorkerInfo, engines: dict[str, AbstractEngine]
) -> None:
    """Register, then heartbeat (running count + progress); register again when forgotten."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc.CoordinatorStub(channel)
        interval, registered = 1.0, False
        while True:
            try:
                if not registered:
                    reply = await stub.RegisterWorker(pb.RegisterWorkerRequest(worker=info), timeout=5)
                    interval, registered = reply.heartbeat_interval_s or 1.0, True
                    log.info("registered with coordinator %s", address)
                healths = [e.health() for e in engines.values()]
                beat = await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        worker_id=info.worker_id,
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


async def _deregister(address: str, worker_id: str) -> None:
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await rpc.CoordinatorStub(channel).DeregisterWorker(
                pb.DeregisterWorkerRequest(worker_id=worker_id), timeout=3
            )
    except grpc.aio.AioRpcError as exc:
        log.warning("could not deregister from %s: %s", address, exc.code().name)
