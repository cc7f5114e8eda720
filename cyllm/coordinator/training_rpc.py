"""The Coordinator service's training and file calls (a mixin of ``CoordinatorService``).
Each acts for the tenant the call carries (``protocol.tenant``).  Errors become gRPC
statuses at the server's edge (``protocol.server``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from cyllm.coordinator.files import FileStore
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb
from cyllm.protocol.tenant import Tenant


class TrainingRPCs:
    training: TrainingManager
    files: FileStore
    visible_models: Callable[[Tenant], Awaitable[list[pb.ModelInfo]]]  # CoordinatorService's

    async def CreateTrainingJob(self, request, context) -> pb.TrainingJob:
        tenant = Tenant.of(context)
        visible = {m.id for m in await self.visible_models(tenant)}
        return await self.training.create(request, tenant, visible)

    async def GetTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.get(request.id, Tenant.of(context))

    async def ListTrainingJobs(self, request, context) -> pb.ListTrainingJobsResponse:
        jobs, more = await self.training.list(Tenant.of(context), request.limit or 20, request.after)
        return pb.ListTrainingJobsResponse(jobs=jobs, has_more=more)

    async def CancelTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.cancel(request.id, Tenant.of(context))

    async def ListTrainingEvents(self, request, context) -> pb.TrainingEventsResponse:
        await self.training.get(request.id, Tenant.of(context))
        limit = request.limit or 0
        events = await self.training.store.events(request.id, request.after_seq,
                                                  limit + 1 if limit else 0)
        more = bool(limit) and len(events) > limit
        return pb.TrainingEventsResponse(events=events[:limit] if limit else events, has_more=more)

    async def WatchTrainingJob(self, request, context) -> AsyncIterator[pb.TrainingEvent]:
        async for event in self.training.watch(request.id, request.after_seq, Tenant.of(context)):
            yield event

    async def UploadFile(self, request_iterator, context) -> pb.FileInfo:
        return await self.files.upload(request_iterator, Tenant.of(context))

    async def GetFile(self, request, context) -> pb.FileInfo:
        return await self.files.get(request.id, Tenant.of(context))

    async def ListFiles(self, request, context) -> pb.ListFilesResponse:
        return pb.ListFilesResponse(files=await self.files.list(Tenant.of(context), request.purpose))

    async def DeleteFile(self, request, context) -> pb.DeleteFileResponse:
        await self.files.delete(request.id, Tenant.of(context))
        return pb.DeleteFileResponse(deleted=True)
