"""Loading and unloading models on workers, on an operator's request.

A load goes to a healthy worker that has the model (or, for ``base:adapter``, its base)
in its catalog: one that already serves the base first, then the one with the most free
memory by its own accounting.  The worker's new registration comes back in the reply
and is recorded at once, so the model is routable as soon as the call returns.
An unload goes to every worker serving the model (or the one named).
"""

from __future__ import annotations

from cyllm import errors
from cyllm.coordinator.scheduler import Scheduler, WorkerView
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol import pb


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
                raise errors.InvalidRequest(f"no worker {worker_id!r} is registered",
                                            param="worker_id")
            views = [v for v in views if v.record.worker_id == worker_id]
            if not views:
                raise errors.Unavailable(f"worker {worker_id!r} is not healthy")
        candidates = [v for v in views if _has(v, base)]
        if not candidates:
            known = sorted({m.id for v in views
                            for m in list(v.record.info.models) + list(v.record.info.available)})
            raise errors.ModelNotFound(
                f"no healthy worker has model {base!r} in its catalog; known: "
                f"{', '.join(known) or 'none'}", param="model")

        def rank(v: WorkerView) -> tuple[bool, int]:
            info = v.record.info
            serving = any(m.id == base for m in info.models)
            return (not serving, -(info.memory_budget_bytes - info.memory_used_bytes))

        return min(candidates, key=rank)

    async def load(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        view = await self._target(request.model, request.worker_id)
        reply = await self.workers.load_model(
            view.record.info.address,
            pb.LoadModelRequest(model=request.model, adapter_path=request.adapter_path))
        await self.scheduler.register(reply.worker)
        return reply

    async def unload(self, request: pb.UnloadModelRequest) -> pb.UnloadModelResponse:
        views = [v for v in await self.scheduler.workers() if v.record.serves(request.model)
                 and (not request.worker_id or v.record.worker_id == request.worker_id)]
        if not views:
            raise errors.ModelNotFound(f"no worker serves model {request.model!r}", param="model")
        done: list[str] = []
        for view in views:
            try:
                reply = await self.workers.unload_model(view.record.info.address,
                                                        pb.UnloadModelRequest(model=request.model))
            except errors.ModelNotFound:
                continue  # unloaded meanwhile
            await self.scheduler.register(reply.worker)
            done.append(view.record.worker_id)
        return pb.UnloadModelResponse(worker_ids=done)
