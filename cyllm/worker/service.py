"""The worker's gRPC service: runs generations on its engines, loads models, runs
training jobs.  Errors become gRPC statuses at the server's edge (``protocol.server``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractContextManager, aclosing, nullcontext
from pathlib import Path

import grpc

from cyllm import errors, tracing
from cyllm.protocol import pb, rpc
from cyllm.protocol.session import Encoder, Sessions
from cyllm.worker.convert import event_to_proto, request_from_proto
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.grammar_guard import COMPILING_FOR
from cyllm.worker.engines.types import Event, Finished, TextDelta
from cyllm.worker.metrics import WorkerMetrics
from cyllm.worker.models import ModelManager
from cyllm.worker.training.jobs import WorkerTraining

log = logging.getLogger(__name__)

ENCODER: Encoder[Event] = Encoder(
    event_to_proto, is_delta=lambda e: isinstance(e, TextDelta), join=TextDelta.joined
)


class WorkerService(rpc.WorkerServicer):
    def __init__(
        self,
        worker_id: str,
        models: ModelManager,
        metrics: WorkerMetrics,
        info: Callable[[], pb.WorkerInfo] | None = None,
        training: WorkerTraining | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.models = models
        self.metrics = metrics
        self.info = info or (lambda: pb.WorkerInfo(worker_id=worker_id))
        self.training = training
        self.draining = False
        self.sessions = Sessions()

    async def Session(
        self, requests: AsyncIterator[pb.SessionRequests], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.SessionEvents, None]:
        """Generations as calls of one long-lived stream (``protocol/session.py``): how
        coordinators reach a worker.  The engines' events become messages there, a
        call's deltas merged while they wait for the stream."""
        async with aclosing(self.sessions.serve(requests, self._generate, ENCODER)) as frames:
            async for frame in frames:
                yield frame

    async def _generate(self, request: pb.GenerateRequest, request_id: str) -> AsyncGenerator[Event, None]:
        """The engine's events for ``request``; closing this (a cancelled call: the client
        gone) aborts the request inside the engine."""
        timer = self.metrics.timer(request.model)
        rid = request_id or request.request_id
        COMPILING_FOR.set(request.tenant)  # this call's task: its schema's turn is its tenant's
        span = tracing.start(
            "worker.generate",
            request.traceparent,
            "server",
            **{
                "cyllm.request_id": rid,
                "gen_ai.request.model": request.model,
                "cyllm.worker": self.worker_id,
            },
        )
        began, first, error = time.perf_counter(), True, None
        try:
            with self._demand():  # a training job on this device gives way meanwhile
                if self.draining:
                    raise errors.Unavailable(f"worker {self.worker_id} is draining")
                engine, adapter = await self.models.resolve_or_load(request.model)
                gen_request = dataclasses.replace(request_from_proto(request), adapter=adapter)
                async with aclosing(engine.generate(gen_request)) as events:
                    async for event in events:
                        if isinstance(event, TextDelta):
                            timer.text()
                            if first and span is not None:  # vLLM's name, in seconds
                                first = False
                                span.set_attribute(
                                    "gen_ai.latency.time_to_first_token", time.perf_counter() - began
                                )
                        elif isinstance(event, Finished):
                            if span is not None:
                                span.set_attribute("gen_ai.usage.input_tokens", event.prompt_tokens)
                                span.set_attribute("gen_ai.usage.output_tokens", event.completion_tokens)
                                span.set_attribute("gen_ai.response.finish_reasons", [event.finish_reason])
                            timer.done(event.finish_reason, event.completion_tokens)
                            log.debug(
                                "generation %s",
                                event.finish_reason,
                                extra={
                                    "request_id": rid,
                                    "model": request.model,
                                    "outcome": event.finish_reason,
                                    "prompt_tokens": event.prompt_tokens,
                                    "completion_tokens": event.completion_tokens,
                                },
                            )
                        yield event
        except errors.CyllmError as exc:
            error = exc.code
            timer.failed(exc.code)
            log.info(
                "generation refused: %s",
                exc.code,
                extra={"request_id": rid, "model": request.model, "outcome": exc.code},
            )
            raise
        except BaseException as exc:  # cancelled (the call moved elsewhere, the caller left), or a bug
            error = "cancelled" if isinstance(exc, asyncio.CancelledError) else type(exc).__name__
            raise
        finally:
            tracing.end(span, error=error)

    def _demand(self) -> AbstractContextManager[None]:
        return self.training.demand.serving() if self.training is not None else nullcontext()

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if self.draining:
            raise errors.Unavailable(f"worker {self.worker_id} is draining")
        engine, adapter = await self.models.resolve_or_load(request.model)
        if adapter is not None:
            raise errors.InvalidRequest(
                "embeddings come from a base model, not a LoRA adapter", param="model"
            )
        spec = engine.spec
        if spec.task != "embed" and not spec.embeddings:
            raise errors.InvalidRequest(
                f"model {spec.id!r} does not answer embeddings here (embeddings: false in its spec)",
                param="model",
            )
        with self._demand():
            vectors, tokens = await engine.embed(list(request.inputs), request.dimensions)
        return pb.EmbedResponse(data=[pb.Embedding(values=v) for v in vectors], prompt_tokens=tokens)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """vLLM's /tokenize and /detokenize with the model's own tokenizer (and chat
        template); an engine without one refuses by name."""
        engine, _ = await self.models.resolve_or_load(request.model)
        if not isinstance(engine, Engine) or engine.tokenizer is None:
            raise errors.InvalidRequest(
                f"the {engine.name} engine serving {request.model!r} does not tokenize here", param="model"
            )
        length = engine.context_length
        if request.WhichOneof("input") == "tokens":
            return pb.TokenizeResponse(
                prompt=await engine.detokenize(list(request.tokens.ids)), max_model_len=length
            )
        wire = pb.GenerateRequest(request_id="tokenize", model=request.model, tools=request.tools)
        if request.WhichOneof("input") == "messages":
            wire.messages.CopyFrom(request.messages)
        else:
            wire.prompt = request.prompt
        ids, strs = await engine.tokenize(request_from_proto(wire))
        return pb.TokenizeResponse(tokens=ids, token_strs=strs, max_model_len=length)

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        try:
            if self.draining:
                raise errors.Unavailable(f"worker {self.worker_id} is draining")
            path = Path(request.adapter_path) if request.adapter_path else None
            if request.from_model:
                self.models.register(
                    request.model,
                    request.from_model,
                    Path(request.model_path) if request.model_path else None,
                    Path(request.peft_adapter_path) if request.peft_adapter_path else None,
                )
            keep_alive = request.keep_alive_s if request.HasField("keep_alive_s") else None
            evicted = await self.models.load(request.model, path, keep_alive)
        except errors.CyllmError as exc:
            log.info("load of %s refused: %s", request.model, exc.message)
            raise
        return pb.LoadModelResponse(worker=self.info(), worker_id=self.worker_id, evicted=evicted)

    async def Forget(self, request: pb.ForgetRequest, context) -> pb.ForgetResponse:
        """A model made here was deleted: unload it, drop it, delete its artefact where
        it lies under this worker's training folder."""
        root = self.training.root if self.training is not None else None
        deleted = False
        if root is not None:
            deleted = await self.models.forget(
                request.model, Path(request.path) if request.path else None, root
            )
        else:
            await self.models.forget(request.model, None, Path("/nonexistent"))
        return pb.ForgetResponse(worker=self.info(), deleted=deleted)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        await self.models.unload(request.model)
        return pb.UnloadModelResponse(worker_ids=[self.worker_id], worker=self.info())

    async def Train(self, request: pb.TrainRequest, context) -> AsyncIterator[pb.TrainingEvent]:
        """Run a training job; a cancelled call (the job cancelled) stops its process."""
        span = tracing.start(
            "worker.train", request.traceparent, "server", **{"cyllm.job_id": request.job_id}
        )
        error = None
        try:
            if self.draining or self.training is None:
                raise errors.Unavailable(f"worker {self.worker_id} takes no training now")
            async with aclosing(self.training.train(request)) as events:
                async for event in events:
                    if span is not None and event.type == "metrics":
                        span.set_attribute("cyllm.step", event.progress.step)
                    yield event
        except errors.CyllmError as exc:
            error = exc.code
            log.info("training job %s refused: %s", request.job_id, exc.message)
            raise
        finally:
            tracing.end(span, error=error)
