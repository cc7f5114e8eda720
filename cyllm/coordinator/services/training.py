"""``Training`` (fine-tuning jobs) and ``Files`` (uploaded datasets).  Each call acts
for the tenant it carries (``protocol.tenant``): another tenant's job or file reads as
a missing one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from cyllm.coordinator.files import FileStore
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb, rpc
from cyllm.protocol.tenant import Tenant

Visible = Callable[[Tenant], Awaitable[list[pb.ModelInfo]]]


class TrainingService(rpc.TrainingServicer):
    def __init__(self, training: TrainingManager, visible: Visible) -> None:
        """``visible``: the models a tenant may use (a job's base model must be one)."""
        self.training = training
        self.visible = visible

    async def CreateTrainingJob(self, request, context) -> pb.TrainingJob:
        tenant = Tenant.of(context)
        visible = {m.id for m in await self.visible(tenant)}
        return await self.training.create(request, tenant, visible)

    async def GetTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.get(request.id, Tenant.of(context))

    async def ListTrainingJobs(self, request, context) -> pb.ListTrainingJobsResponse:
        jobs, more = await self.training.page(Tenant.of(context), request.limit or 20, request.after)
        return pb.ListTrainingJobsResponse(jobs=jobs, has_more=more)

    async def CancelTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.cancel(request.id, Tenant.of(context))

    async def ListTrainingEvents(self, request, context) -> pb.TrainingEventsResponse:
        await self.training.get(request.id, Tenant.of(context))
        limit = request.limit or 0
        events = await self.training.store.events(request.id, request.after_seq, limit + 1 if limit else 0)
        more = bool(limit) and len(events) > limit
        return pb.TrainingEventsResponse(events=events[:limit] if limit else events, has_more=more)

    async def WatchTrainingJob(self, request, context) -> AsyncIterator[pb.TrainingEvent]:
        async for event in self.training.watch(request.id, request.after_seq, Tenant.of(context)):
            yield event


class FilesService(rpc.FilesServicer):
    def __init__(self, files: FileStore) -> None:
        self.files = files

    async def UploadFile(self, request_iterator, context) -> pb.FileInfo:
        return await self.files.upload(request_iterator, Tenant.of(context))

    async def GetFile(self, request, context) -> pb.FileInfo:
        return await self.files.get(request.id, Tenant.of(context))

    async def ListFiles(self, request, context) -> pb.ListFilesResponse:
        return pb.ListFilesResponse(files=await self.files.owned(Tenant.of(context), request.purpose))

    async def DeleteFile(self, request, context) -> pb.DeleteFileResponse:
        await self.files.delete(request.id, Tenant.of(context))
        return pb.DeleteFileResponse(deleted=True)

    async def ReadFile(self, request, context) -> AsyncIterator[pb.FileChunk]:
        async for chunk in self.files.read(request.id, Tenant.of(context), request.offset):
            yield chunk
