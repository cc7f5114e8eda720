"""``WorkerPool``: workers registering, heartbeating and leaving (only a worker's
credentials may call it: ``protocol/plane.py``).

A worker's identity is bound to its credentials as far as they allow:

* a per-worker certificate (``cyllm certs --worker-id``) names one worker: its holder
  registers, heartbeats and deregisters as that worker only, and registers only an
  address among the certificate's hosts;
* the shared token, or a role's certificate, names no worker: any holder may register
  any id, but none takes over a worker that is alive at another address (one that
  beats within the heartbeat timeout) — that would hand it the worker's requests, and
  its tenants' prompts.  A worker restarted at a new address registers again once its
  old record has gone quiet.

Every refusal is logged with the caller's peer address.
"""

from __future__ import annotations

import logging

import grpc

from cyllm import errors
from cyllm.coordinator.scheduler import Scheduler
from cyllm.protocol import pb, rpc
from cyllm.protocol.plane import Plane

log = logging.getLogger(__name__)


class WorkerPoolService(rpc.WorkerPoolServicer):
    def __init__(self, scheduler: Scheduler, heartbeat_interval_s: float, plane: Plane) -> None:
        self.scheduler = scheduler
        self.heartbeat_interval_s = heartbeat_interval_s
        self.plane = plane

    async def RegisterWorker(self, request, context) -> pb.RegisterWorkerResponse:
        worker = request.worker
        if not worker.worker_id or not worker.address:
            raise errors.InvalidRequest("worker_id and address are required")
        named = self.plane.worker_named(context)
        why = (
            named.may_register(worker.worker_id, worker.address)
            if named is not None
            else await self._takeover(worker)
        )
        if why is not None:
            log.warning("registration refused (peer %s): %s", _peer(context), why)
            raise errors.Forbidden(why)
        await self.scheduler.register(worker)
        log.info(
            "worker %s registered at %s serving %s",
            worker.worker_id,
            worker.address,
            [m.id for m in worker.models],
        )
        return pb.RegisterWorkerResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def _takeover(self, worker: pb.WorkerInfo) -> str | None:
        """Why registering ``worker`` would take over a live worker's id, or None."""
        for view in await self.scheduler.workers():
            beating = view.heartbeat_age_s <= self.scheduler.rules.heartbeat_timeout_s
            if (
                view.record.worker_id == worker.worker_id
                and beating
                and view.record.info.address != worker.address
            ):
                return (
                    f"worker {worker.worker_id!r} is alive at another address; a worker takes "
                    "over an id only once its old registration has gone quiet"
                )
        return None

    async def Heartbeat(self, request, context) -> pb.HeartbeatResponse:
        self._acting_as(request.worker_id, context)
        known = await self.scheduler.heartbeat(request.worker_id, request.running, request.tokens_generated)
        return pb.HeartbeatResponse(known=known)

    async def DeregisterWorker(self, request, context) -> pb.DeregisterWorkerResponse:
        self._acting_as(request.worker_id, context)
        await self.scheduler.deregister(request.worker_id)
        log.info("worker %s deregistered", request.worker_id)
        return pb.DeregisterWorkerResponse()

    def _acting_as(self, worker_id: str, context: grpc.aio.ServicerContext) -> None:
        named = self.plane.worker_named(context)
        if named is not None and named.worker_id != worker_id:
            log.warning(
                "worker %s's certificate acted as %s (peer %s): refused",
                named.worker_id,
                worker_id,
                _peer(context),
            )
            raise errors.Forbidden(
                f"a certificate of worker {named.worker_id!r} may not act as worker {worker_id!r}"
            )


def _peer(context: grpc.aio.ServicerContext) -> str:
    return context.peer() if hasattr(context, "peer") else "in-process"
