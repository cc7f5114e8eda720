"""``WorkerPool``: workers registering, heartbeating and leaving (only a worker's
credentials may call it: ``protocol/plane.py``)."""

from __future__ import annotations

import logging

from cyllm import errors
from cyllm.coordinator.scheduler import Scheduler
from cyllm.protocol import pb, rpc

log = logging.getLogger(__name__)


class WorkerPoolService(rpc.WorkerPoolServicer):
    def __init__(self, scheduler: Scheduler, heartbeat_interval_s: float) -> None:
        self.scheduler = scheduler
        self.heartbeat_interval_s = heartbeat_interval_s

    async def RegisterWorker(self, request, context) -> pb.RegisterWorkerResponse:
        if not request.worker.worker_id or not request.worker.address:
            raise errors.InvalidRequest("worker_id and address are required")
        await self.scheduler.register(request.worker)
        log.info(
            "worker %s registered at %s serving %s",
            request.worker.worker_id,
            request.worker.address,
            [m.id for m in request.worker.models],
        )
        return pb.RegisterWorkerResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request, context) -> pb.HeartbeatResponse:
        known = await self.scheduler.heartbeat(request.worker_id, request.running, request.tokens_generated)
        return pb.HeartbeatResponse(known=known)

    async def DeregisterWorker(self, request, context) -> pb.DeregisterWorkerResponse:
        await self.scheduler.deregister(request.worker_id)
        log.info("worker %s deregistered", request.worker_id)
        return pb.DeregisterWorkerResponse()
