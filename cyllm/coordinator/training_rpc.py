"""The Coordinator service's training and file calls (a mixin of ``CoordinatorService``):
errors become gRPC statuses here, once (``_edge``)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

from cyllm import errors
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb, status


def _edge(handler):
    """A unary handler whose CyllmError aborts the call with its status."""

    @functools.wraps(handler)
    async def call(self, request, context):
        try:
            return await handler(self, request, context)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    return call


class TrainingRPCs:
    training: TrainingManager
    files: FileStore

    @_edge
    async def CreateTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.create(request)

    @_edge
    async def GetTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.get(request.id)

    @_edge
    async def ListTrainingJobs(self, request, context) -> pb.ListTrainingJobsResponse:
        jobs, more = await self.training.store.list(request.limit or 20, request.after)
        return pb.ListTrainingJobsResponse(jobs=jobs, has_more=more)

    @_edge
    async def CancelTrainingJob(self, request, context) -> pb.TrainingJob:
        return await self.training.cancel(request.id)

    @_edge
    async def ListTrainingEvents(self, request, context) -> pb.TrainingEventsResponse:
        await self.training.get(request.id)
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

    @_edge
    async def UploadFile(self, request_iterator, context) -> pb.FileInfo:
        return await self.files.upload(request_iterator)

    @_edge
    async def GetFile(self, request, context) -> pb.FileInfo:
        return await self.files.get(request.id)

    @_edge
    async def ListFiles(self, request, context) -> pb.ListFilesResponse:
        files = await self.training.store.files()
        return pb.ListFilesResponse(files=[f for f in files if not request.purpose
                                           or f.purpose == request.purpose])

    @_edge
    async def DeleteFile(self, request, context) -> pb.DeleteFileResponse:
        await self.files.delete(request.id)
        return pb.DeleteFileResponse(deleted=True)
