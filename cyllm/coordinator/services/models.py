"""``Models``: what is served where, loading and unloading models on workers on an
operator's request, and the cluster's status.

A load goes to a healthy worker that has the model (or, for ``base:adapter``, its base)
in its catalog: one that already serves the base first, then the one with the most free
memory by its own accounting.  The worker's new registration comes back in the reply
and is recorded at once, so the model is routable as soon as the call returns.
An unload goes to every worker serving the model (or the one named).
"""

from __future__ import annotations

import logging

from cyllm import errors
from cyllm.coordinator.cache import PromptCache
from cyllm.coordinator.owners import ModelOwners
from cyllm.coordinator.scheduler import Scheduler, WorkerView
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol import pb, rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.tenant import PUBLIC, Tenant

log = logging.getLogger(__name__)


def _has(view: WorkerView, model: str) -> bool:
    info = view.record.info
    return any(m.id == model for m in list(info.models) + list(info.available))


class ModelAdmin:
    def __init__(self, scheduler: Scheduler, workers: WorkerClients) -> None:
        self.scheduler = scheduler
        self.workers = workers

    async def _target(self, model: str, worker_id: str) -> WorkerView:
        base = model.partition(":")[0]
        everyone = await self.scheduler.workers()
        views = [v for v in everyone if v.healthy]
        if worker_id:
            if not any(v.record.worker_id == worker_id for v in everyone):
                raise errors.InvalidRequest(f"no worker {worker_id!r} is registered", param="worker_id")
            views = [v for v in views if v.record.worker_id == worker_id]
            if not views:
                raise errors.Unavailable(f"worker {worker_id!r} is not healthy")
        candidates = [v for v in views if _has(v, base)]
        if not candidates:
            known = sorted(
                {m.id for v in views for m in list(v.record.info.models) + list(v.record.info.available)}
            )
            raise errors.ModelNotFound(
                f"no healthy worker has model {base!r} in its catalog; known: {', '.join(known) or 'none'}",
                param="model",
            )

        def rank(v: WorkerView) -> tuple[bool, int]:
            info = v.record.info
            serving = any(m.id == base for m in info.models)
            return (not serving, -(info.memory_budget_bytes - info.memory_used_bytes))

        return min(candidates, key=rank)

    async def load(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        view = await self._target(request.model, request.worker_id)
        reply = await self.workers.load_model(
            view.record.info.address,
            pb.LoadModelRequest(model=request.model, adapter_path=request.adapter_path),
        )
        await self.scheduler.register(reply.worker)
        return reply

    async def unload(self, request: pb.UnloadModelRequest) -> pb.UnloadModelResponse:
        views = [
            v
            for v in await self.scheduler.workers()
            if v.record.serves(request.model)
            and (not request.worker_id or v.record.worker_id == request.worker_id)
        ]
        if not views:
            raise errors.ModelNotFound(f"no worker serves model {request.model!r}", param="model")
        done: list[str] = []
        for view in views:
            try:
                reply = await self.workers.unload_model(
                    view.record.info.address, pb.UnloadModelRequest(model=request.model)
                )
            except errors.ModelNotFound:
                continue  # unloaded meanwhile
            await self.scheduler.register(reply.worker)
            done.append(view.record.worker_id)
        return pb.UnloadModelResponse(worker_ids=done)


class ModelsService(rpc.ModelsServicer):
    def __init__(
        self,
        coordinator_id: str,
        scheduler: Scheduler,
        cache: PromptCache,
        owners: ModelOwners,
        workers: WorkerClients,
        breakers: CircuitBreakers,
    ) -> None:
        """``breakers``: the workers' circuits, as the inference service keeps them."""
        self.coordinator_id = coordinator_id
        self.scheduler = scheduler
        self.cache = cache
        self.owners = owners
        self.breakers = breakers
        self.admin = ModelAdmin(scheduler, workers)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=await self.visible(Tenant.of(context)))

    async def visible(self, tenant: Tenant) -> list[pb.ModelInfo]:
        """The models ``tenant`` may use: public ones and its own."""
        owners = await self.owners.all()
        return [
            m
            for m in await self.scheduler.models()
            if tenant.sees(owners.get(m.id, PUBLIC)) and (tenant.models is None or m.id in tenant.models)
        ]

    async def LoadModel(self, request, context) -> pb.LoadModelResponse:
        reply = await self.admin.load(request)
        log.info(
            "model %s loaded on %s (evicted: %s)",
            request.model,
            reply.worker_id,
            list(reply.evicted) or "none",
        )
        return reply

    async def UnloadModel(self, request, context) -> pb.UnloadModelResponse:
        reply = await self.admin.unload(request)
        log.info("model %s unloaded from %s", request.model, list(reply.worker_ids))
        return reply

    async def ClusterStatus(self, request, context) -> pb.ClusterStatusResponse:
        opened = self.breakers.open_peers()
        return pb.ClusterStatusResponse(
            workers=[
                pb.WorkerState(
                    worker=v.record.info,
                    healthy=v.healthy and v.record.worker_id not in opened,
                    outstanding=v.record.outstanding,
                    last_heartbeat_age_s=max(0.0, v.heartbeat_age_s),
                    unhealthy_reason=v.unhealthy_reason
                    or ("circuit open" if v.record.worker_id in opened else ""),
                    running=v.record.running,
                    tokens_generated=v.record.tokens,
                )
                for v in await self.scheduler.workers()
            ],
            queue_depth=await self.scheduler.queue_depth(),
            queue_capacity=self.scheduler.queue_capacity,
            cache_hits=await self.cache.hits(),
            cache_misses=await self.cache.misses(),
            coordinator_id=self.coordinator_id,
            backend=self.scheduler.backend,
        )
