"""Loading models onto workers: on an operator's request (``ModelAdmin``), and on
demand (``Loader``): a request for a model no worker holds loads it, and waits.

A load goes to a healthy worker that has the model (or its base) in its catalog: one
that already serves the base first, then the one with the most free memory by its own
accounting.  The worker's new registration comes back in the reply and is recorded at
once, so the model is routable as soon as the call returns.  An unload goes to every
worker serving the model (or the one named).

The model a request names may be a record of the registry (a fine-tuned model, after a
worker restarted, after its base was evicted, after it went unused past its
keep-alive) or a configured model some worker has in its catalog without having it
loaded.  Either way it is loaded on a worker that can hold it (``ModelAdmin``: one
serving its base first, then the one with the most free memory, unloading idle models
there if memory is short) while the request waits, as it would in the queue: the
client sees only latency.  Requests for one model while it loads share that load.
"""

from __future__ import annotations

import asyncio
import logging

from cyllm import errors
from cyllm.coordinator.registry import Registry
from cyllm.coordinator.scheduler import Scheduler, WorkerView
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol import pb
from cyllm.protocol.tenant import PUBLIC, Tenant

log = logging.getLogger(__name__)


def _has(view: WorkerView, model: str) -> bool:
    info = view.record.info
    return any(m.id == model for m in list(info.models) + list(info.available))


class ModelAdmin:
    def __init__(self, scheduler: Scheduler, workers: WorkerClients) -> None:
        self.scheduler = scheduler
        self.workers = workers

    async def _target(self, base: str, worker_id: str) -> WorkerView:
        """The worker to load a model of ``base`` on (serving the base first, then the
        one with the most free memory), or ``worker_id``."""
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

    async def load(self, request: pb.LoadModelRequest, base: str = "") -> pb.LoadModelResponse:
        """``base``: what a worker's catalog must hold (default: the model's id before
        any ``:adapter``)."""
        view = await self._target(base or request.model.partition(":")[0], request.worker_id)
        forward = pb.LoadModelRequest()
        forward.CopyFrom(request)
        forward.ClearField("worker_id")
        reply = await self.workers.load_model(view.record.info.address, forward)
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


class Loader:
    def __init__(self, scheduler: Scheduler, registry: Registry, admin: ModelAdmin) -> None:
        self.scheduler = scheduler
        self.registry = registry
        self.admin = admin
        self._loading: dict[str, asyncio.Task[None]] = {}

    async def ensure(self, model: str, tenant: Tenant) -> bool:
        """Load ``model`` where it can be held, if the tenant may use it and no worker
        serves it; False when there is nothing to load (unknown, or not theirs)."""
        request, base = await self._request(model, tenant)
        if request is None:
            return False
        task = self._loading.get(model)
        if task is None:
            task = self._loading[model] = asyncio.create_task(self._load(request, base))
            task.add_done_callback(lambda _: self._loading.pop(model, None))
        await asyncio.shield(task)  # a caller leaving does not stop the load for the others
        return True

    async def _request(self, model: str, tenant: Tenant) -> tuple[pb.LoadModelRequest | None, str]:
        record = await self.registry.get(model)
        if record is not None:
            if not tenant.sees(record.visibility):
                return None, ""
            return record.load_request(), record.base
        if not tenant.sees((await self.registry.all()).get(model, PUBLIC)):  # a deleted one, say
            return None, ""
        views = await self.scheduler.workers()
        if any(v.healthy and any(m.id == model for m in v.record.info.available) for v in views):
            return pb.LoadModelRequest(model=model), model
        return None, ""

    async def _load(self, request: pb.LoadModelRequest, base: str) -> None:
        """The load, its refusals told to a tenant without naming any other model (the
        workers' own messages list their catalogs and what they hold)."""
        log.info("loading model %s on demand", request.model)
        try:
            reply = await self.admin.load(request, base)
        except errors.InsufficientMemory as exc:
            log.info("model %s not loaded on demand: %s", request.model, exc.message)
            raise errors.InsufficientMemory(
                f"model {request.model!r} does not fit beside the models in use on any worker now; "
                "try again later",
                param="model",
            ) from None
        except (errors.ModelNotFound, errors.NotLoadable) as exc:
            log.warning("model %s not loaded on demand: %s", request.model, exc.message)
            raise errors.Unavailable(f"no healthy worker can load model {request.model!r} now") from None
        log.info(
            "model %s loaded on demand on %s (evicted: %s)",
            request.model,
            reply.worker_id,
            list(reply.evicted) or "none",
        )
