"""``Models``: what a tenant may use (loaded, or loadable on demand), loading and
unloading models on workers on an operator's request (``coordinator/loading.py``), the
cluster's status, and what tenants do with the models they made (delete, publish,
export, alias: ``coordinator/lifecycle.py``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from cyllm.coordinator.cache import PromptCache
from cyllm.coordinator.lifecycle import Lifecycle
from cyllm.coordinator.loading import ModelAdmin
from cyllm.coordinator.registry import AliasMove, Registry
from cyllm.coordinator.scheduler import Scheduler
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol import pb, rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.tenant import PUBLIC, Tenant

log = logging.getLogger(__name__)


class ModelsService(rpc.ModelsServicer):
    def __init__(
        self,
        coordinator_id: str,
        scheduler: Scheduler,
        cache: PromptCache,
        registry: Registry,
        workers: WorkerClients,
        breakers: CircuitBreakers,
        private: Sequence[Path] = (),
    ) -> None:
        """``breakers``: the workers' circuits, as the inference service keeps them;
        ``private``: folders of the coordinator's own that no export may read."""
        self.coordinator_id = coordinator_id
        self.scheduler = scheduler
        self.cache = cache
        self.registry = registry
        self.breakers = breakers
        self.admin = ModelAdmin(scheduler, workers)
        self.lifecycle = Lifecycle(scheduler, registry, self.admin, workers, private)

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=await self.visible(Tenant.of(context)))

    async def visible(self, tenant: Tenant) -> list[pb.ModelInfo]:
        """The models ``tenant`` may use — public ones, its own and those published to
        it — loaded or loadable (a model made here loads on demand: ``loading.py``)."""
        snapshot = await self.registry.snapshot()
        found: dict[str, pb.ModelInfo] = {}
        for m in await self.scheduler.models():  # copies: the scheduler's own are not ours to change
            found[m.id] = copy = pb.ModelInfo()
            copy.CopyFrom(m)
        for mid, record in snapshot.models.items():
            info = found.setdefault(mid, pb.ModelInfo(id=mid, state="available", created=record.created_at))
            info.base, info.kind, info.job_id = record.base, record.kind, record.job_id
            info.evaluation.update(record.evaluation)
            if tenant.owns(record.owner):
                info.owner, info.path = record.owner, record.path
                info.published_to.extend(record.published)
        mine: dict[str, list[str]] = {}
        for (owner, name), target in snapshot.aliases.items():
            if owner == tenant.subject:
                mine.setdefault(target, []).append(name)
        out = []
        for mid, info in sorted(found.items()):
            if tenant.sees(snapshot.visibility.get(mid, PUBLIC)) and (
                tenant.models is None or mid in tenant.models
            ):
                info.aliases.extend(sorted(mine.get(mid, ())))
                out.append(info)
        return out

    async def DeleteModel(self, request, context) -> pb.DeleteModelResponse:
        unloaded = await self.lifecycle.delete(request.model, Tenant.of(context))
        return pb.DeleteModelResponse(model=request.model, worker_ids=unloaded)

    async def PublishModel(self, request, context) -> pb.ModelInfo:
        tenant = Tenant.of(context)
        record = await self.lifecycle.publish(request, tenant)
        shown = [m for m in await self.visible(tenant) if m.id == request.model]
        return shown[0] if shown else pb.ModelInfo(id=record.id, base=record.base, kind=record.kind)

    async def ExportModel(self, request, context) -> AsyncIterator[pb.FileChunk]:
        async for chunk in self.lifecycle.export(request.model, Tenant.of(context)):
            yield chunk

    async def SetAlias(self, request, context) -> pb.Alias:
        tenant = Tenant.of(context)
        await self.lifecycle.set_alias(request, tenant)
        return await self.GetAlias(request, context)

    async def GetAlias(self, request, context) -> pb.Alias:
        target, moves = await self.lifecycle.alias(request.name, Tenant.of(context))
        return pb.Alias(name=request.name, model=target, moves=[_move(m) for m in moves])

    async def ListAliases(self, request, context) -> pb.ListAliasesResponse:
        tenant = Tenant.of(context)
        names = await self.registry.aliases(tenant.subject)
        return pb.ListAliasesResponse(aliases=[pb.Alias(name=n, model=m) for n, m in sorted(names.items())])

    async def DeleteAlias(self, request, context) -> pb.Alias:
        target = await self.lifecycle.drop_alias(request.name, Tenant.of(context))
        return pb.Alias(name=request.name, model=target)

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


def _move(m: AliasMove) -> pb.AliasMove:
    return pb.AliasMove(from_model=m.from_model, to_model=m.to_model, by=m.by, at=m.at, reason=m.reason)
