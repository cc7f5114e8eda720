"""The Coordinator service's training and file calls (a mixin of ``CoordinatorService``).
Errors become gRPC statuses at the server's edge (``protocol.server``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cyllm.coordinator.files import FileStore
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb


class TrainingRPCs:
    training: TrainingManager
    files: FileStore

    async def CreateTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.create(request)

    async def GetTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.get(request.id)

    async def ListTrainingJobs(self, request, context) -> pb.ListTrainingJobsResponse:
        jobs, more = await self.training.store.list(request.limit or 20, request.after)
        return pb.ListTrainingJobsResponse(jobs=jobs, has_more=more)

    async def CancelTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.cancel(request.id)

    async def ListTrainingEvents(self, request, context) -> pb.TrainingEventsResponse:
        await self.training.get(request.id)
        limit = request.limit or 0
        events = await self.training.store.events(request.id, request.after_seq,
                                                  limit + 1 if limit else 0)
        more = bool(limit) and len(events) > limit
        return pb.TrainingEventsResponse(events=events[:limit] if limit else events, has_more=more)

    async def WatchTrainingJob(self, request, context) -> AsyncIterator[pb.TrainingEvent]:
        async for event in self.training.watch(request.id, request.after_seq):
            yield event

    async def UploadFile(self, request_iterator, context) -> pb.FileInfo:
        return await self.files.upload(request_iterator)

    async def GetFile(self, request, context) -> pb.FileInfo:
        return await self.files.get(request.id)

    async def ListFiles(self, request, context) -> pb.ListFilesResponse:
        files = await self.training.store.files()
        return pb.ListFilesResponse(files=[f for f in files if not request.purpose
                                           or f.purpose == request.purpose])

    async def DeleteFile(self, request, context) -> pb.DeleteFileResponse:
        await self.files.delete(request.id)
        return pb.DeleteFileResponse(deleted=True)
