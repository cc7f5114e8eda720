"""The Coordinator service's training and file calls (a mixin of ``CoordinatorService``):
errors become gRPC statuses here, once."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cyllm import errors
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb, status


class TrainingRPCs:
    training: TrainingManager
    files: FileStore

    async def CreateTrainingJob(self, request, context) -> pb.TrainingJob:
        try:
            return await self.training.create(request)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    async def GetTrainingJob(self, request, context) -> pb.TrainingJob:
        try:
            return await self.training.get(request.id)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    async def ListTrainingJobs(self, request, context) -> pb.ListTrainingJobsResponse:
        jobs, more = await self.training.store.list(request.limit or 20, request.after)
        return pb.ListTrainingJobsResponse(jobs=jobs, has_more=more)

    async def CancelTrainingJob(self, request, context) -> pb.TrainingJob:
        try:
            return await self.training.cancel(request.id)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    async def ListTrainingEvents(self, request, context) -> pb.TrainingEventsResponse:
        try:
            await self.training.get(request.id)
        except errors.CyllmError as exc:
            await status.abort(context, exc)
        limit = request.limit or 0
        events = await self.training.store.events(request.id, request.after_seq,
                                                  limit + 1 if limit else 0)
        more = bool(limit) and len(events) > limit
        return pb.TrainingEventsResponse(events=events[:limit] if limit else events, has_more=more)

    async def WatchTrainingJob(self, request, context) -> AsyncIterator[pb.TrainingEvent]:
        try:
            async for event in self.training.watch(request.id, request.after_seq):
                yield event
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    async def UploadFile(self, request_iterator, context) -> pb.FileInfo:
        try:
            return await self.files.upload(request_iterator)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    async def GetFile(self, request, context) -> pb.FileInfo:
        try:
            return await self.files.get(request.id)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    async def ListFiles(self, request, context) -> pb.ListFilesResponse:
        files = await self.training.store.files()
        return pb.ListFilesResponse(files=[f for f in files if not request.purpose
                                           or f.purpose == request.purpose])

    async def DeleteFile(self, request, context) -> pb.DeleteFileResponse:
        try:
            await self.files.delete(request.id)
        except errors.CyllmError as exc:
            await status.abort(context, exc)
        return pb.DeleteFileResponse(deleted=True)
