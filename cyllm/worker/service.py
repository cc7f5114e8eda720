"""The worker's gRPC service: runs generations on its engines."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from cyllm import errors
from cyllm.protocol import pb, rpc, status
from cyllm.runtime import request_id_of
from cyllm.worker.convert import event_to_proto, request_from_proto
from cyllm.worker.engines.base import AbstractEngine, Finished, TextDelta
from cyllm.worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class WorkerService(rpc.WorkerServicer):
    def __init__(self, worker_id: str, engines: dict[str, AbstractEngine],
                 metrics: WorkerMetrics) -> None:
        self.worker_id = worker_id
        self.engines = engines
        self.metrics = metrics
        self.draining = False

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        timer = self.metrics.timer(request.model)
        rid = request_id_of(context) or request.request_id
        outcome = "cancelled"
        try:
            if self.draining:
                raise errors.Unavailable(f"worker {self.worker_id} is draining")
            engine = self.engines.get(request.model)
            if engine is None:
                raise errors.ModelNotFound(
                    f"worker {self.worker_id} does not serve model {request.model!r}", param="model"
                )
            # aclosing: a cancelled call (client gone) closes the stream, which aborts
            # the request inside the engine and frees its slot.
            async with aclosing(engine.generate(request_from_proto(request))) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        timer.text()
                    elif isinstance(event, Finished):
                        timer.done(event.finish_reason, event.completion_tokens)
                        outcome = event.finish_reason
                        log.info("generation %s", outcome, extra={
                            "request_id": rid, "model": request.model, "outcome": outcome,
                            "prompt_tokens": event.prompt_tokens,
                            "completion_tokens": event.completion_tokens})
                    yield event_to_proto(event, self.worker_id)
        except errors.CyllmError as exc:
            timer.failed(exc.code)
            log.info("generation refused: %s", exc.code,
                     extra={"request_id": rid, "model": request.model, "outcome": exc.code})
            await status.abort(context, exc)

    async def Status(
        self, request: pb.WorkerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerStatusResponse:
        engines = []
        tokens = 0
        for model_id, engine in self.engines.items():
            h = engine.health()
            tokens += h.tokens_generated
            engines.append(
                pb.EngineStatus(model=model_id, running=h.running, waiting=h.waiting, healthy=h.healthy)
            )
        return pb.WorkerStatusResponse(worker_id=self.worker_id, engines=engines, tokens_generated=tokens)
