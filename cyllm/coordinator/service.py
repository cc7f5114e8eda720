"""The coordinator's gRPC service: the cache, the queue and the worker pool together."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from cyllm import errors
from cyllm.coordinator.cache import CachedResponse, PromptCache, cache_key, is_deterministic
from cyllm.coordinator.dispatcher import Dispatcher
from cyllm.coordinator.queue import Task, TaskQueue
from cyllm.coordinator.registry import WorkerEntry, WorkerRegistry
from cyllm.protocol import pb, rpc, status

log = logging.getLogger(__name__)

# A worker that fails before sending anything is skipped and the request tried again.
_ATTEMPTS = 3


class CoordinatorService(rpc.CoordinatorServicer):
    def __init__(
        self,
        queue: TaskQueue,
        cache: PromptCache,
        registry: WorkerRegistry,
        dispatcher: Dispatcher,
        heartbeat_interval_s: float,
    ) -> None:
        self.queue = queue
        self.cache = cache
        self.registry = registry
        self.dispatcher = dispatcher
        self.heartbeat_interval_s = heartbeat_interval_s

    # -- inference --------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            if not request.request_id:
                request.request_id = uuid.uuid4().hex
            self._check_model(request.model)
            key = cache_key(request) if is_deterministic(request) else None
            cached = self.cache.get(key) if key else None
            if cached is not None:
                for msg in _replay(cached):
                    yield msg
                return
            async for msg in self._run(request, key):
                yield msg
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    def _check_model(self, model: str) -> None:
        if not model:
            raise errors.InvalidRequest("model is required", param="model")
        if any(w.serves(model) for w in self.registry.all()):
            if not self.registry.serving(model):
                raise errors.Unavailable(f"every worker serving model {model!r} is unhealthy")
            return
        known = [m.id for m in self.registry.models()]
        raise errors.ModelNotFound(
            f"model {model!r} does not exist; available models: {', '.join(known) or 'none'}",
            param="model",
        )

    async def _run(self, request: pb.GenerateRequest, key: str | None) -> AsyncIterator[pb.GenerateResponse]:
        for attempt in range(1, _ATTEMPTS + 1):
            worker = await self.dispatcher.acquire(
                Task(request.request_id, request.model, request.priority)
            )
            sent = False
            chunks: list[str] = []
            call = worker.stub.Generate(request)
            try:
                async for msg in call:
                    sent = True
                    kind = msg.WhichOneof("event")
                    if kind == "delta":
                        chunks.append(msg.delta.text)
                    elif kind == "finished" and key and msg.finished.finish_reason != "abort":
                        self.cache.put(key, _to_cached(chunks, msg.finished))
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                err = status.from_grpc(exc)
                if sent or not isinstance(err, errors.Unavailable) or attempt == _ATTEMPTS:
                    raise err from None
                log.warning("worker %s failed before answering (%s); trying another",
                            worker.worker_id, exc.code().name)
                self._suspect(worker)
            finally:
                call.cancel()
                self.dispatcher.release(worker)

    def _suspect(self, worker: WorkerEntry) -> None:
        # Unreachable: treat as unhealthy until its next heartbeat proves otherwise.
        worker.last_heartbeat = float("-inf")

    # -- discovery --------------------------------------------------------------------

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=self.registry.models())

    async def ClusterStatus(self, request, context) -> pb.ClusterStatusResponse:
        now = time.monotonic()
        return pb.ClusterStatusResponse(
            workers=[
                pb.WorkerState(
                    worker=w.info,
                    healthy=self.registry.healthy(w),
                    outstanding=w.outstanding,
                    last_heartbeat_age_s=max(0.0, now - w.last_heartbeat),
                )
                for w in self.registry.all()
            ],
            queue_depth=len(self.queue),
            queue_capacity=self.queue.capacity,
            cache_hits=self.cache.hits,
            cache_misses=self.cache.misses,
        )

    # -- the worker side --------------------------------------------------------------

    async def RegisterWorker(self, request, context) -> pb.RegisterWorkerResponse:
        if not request.worker.worker_id or not request.worker.address:
            await status.abort(context, errors.InvalidRequest("worker_id and address are required"))
        await self.registry.register(request.worker)
        self.dispatcher.pump()
        return pb.RegisterWorkerResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request, context) -> pb.HeartbeatResponse:
        known = self.registry.heartbeat(request.worker_id, request.tokens_generated)
        if known:
            self.dispatcher.pump()
        return pb.HeartbeatResponse(known=known)

    async def DeregisterWorker(self, request, context) -> pb.DeregisterWorkerResponse:
        await self.registry.deregister(request.worker_id)
        return pb.DeregisterWorkerResponse()


def _to_cached(chunks: list[str], finished: pb.Finished) -> CachedResponse:
    return CachedResponse(tuple(chunks), finished.finish_reason, finished.prompt_tokens,
                          finished.completion_tokens)


def _replay(entry: CachedResponse) -> list[pb.GenerateResponse]:
    msgs = [pb.GenerateResponse(started=pb.Started(prompt_tokens=entry.prompt_tokens, cached=True))]
    msgs += [pb.GenerateResponse(delta=pb.Delta(text=c, tokens=0)) for c in entry.chunks]
    msgs.append(pb.GenerateResponse(finished=pb.Finished(
        finish_reason=entry.finish_reason, prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens)))
    return msgs
