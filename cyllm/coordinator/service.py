"""The coordinator's gRPC service: the prompt cache, the scheduler (queue + worker pool)
and the calls to the workers, with per-worker circuit breakers.  A generation whose
worker dies, hangs (nothing for ``progress_timeout_s``) or refuses it as unavailable
moves to another worker, up to ``generation_attempts`` in all: re-run if nothing was
sent yet, resumed from the tokens sent if something was (``protocol.relay``), so the
caller sees one stream either way.  Errors become gRPC statuses at the server's edge
(``protocol.server``)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from cyllm import errors
from cyllm.coordinator.cache import CachedResponse, PromptCache, cache_key, is_deterministic
from cyllm.coordinator.idempotency import MAX_KEY as MAX_IDEMPOTENCY_KEY
from cyllm.coordinator.idempotency import PARAM as IDEMPOTENCY
from cyllm.coordinator.idempotency import Idempotency, scoped
from cyllm.coordinator.metrics import CoordinatorMetrics
from cyllm.coordinator.models import ModelAdmin
from cyllm.coordinator.routing import affinity_key
from cyllm.coordinator.queue import Task
from cyllm.coordinator.scheduler import Keep, Scheduler
from cyllm.coordinator.training_rpc import TrainingRPCs
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol.plane import Plane
from cyllm.protocol import pb, rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.deadline import Deadline, Expired
from cyllm.protocol.session import SessionCall
from cyllm.protocol.relay import Relay
from cyllm.protocol.tenant import PUBLIC, Tenant
from cyllm.runtime import request_id_of
from cyllm.shared_state import unreachable

log = logging.getLogger(__name__)

# Pauses between attempts: a dead worker looks healthy until its heartbeats are missed.
_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)
# Errors that say nothing against the worker: it answered, or our caller left.
_NOT_THE_WORKERS_FAULT = (errors.InvalidRequest, errors.NotFound, errors.RequestCancelled,
                          asyncio.CancelledError, GeneratorExit)


class CoordinatorService(TrainingRPCs, rpc.CoordinatorServicer):
    def __init__(self, coordinator_id: str, scheduler: Scheduler, cache: PromptCache,
                 metrics: CoordinatorMetrics, *, heartbeat_interval_s: float, progress_timeout_s: float,
                 breaker_failures: int, breaker_cooldown_s: float, lease_s: float,
                 plane: Plane, idempotency: Idempotency, attempts: int = 6) -> None:
        self.coordinator_id = coordinator_id
        self.scheduler = scheduler
        self.cache = cache
        self.metrics = metrics
        self.heartbeat_interval_s = heartbeat_interval_s
        self.progress_timeout_s = progress_timeout_s
        self.lease_s = lease_s
        self.attempts = attempts
        self.idempotency = idempotency
        self.workers = WorkerClients(plane)
        self.breakers = CircuitBreakers(breaker_failures, breaker_cooldown_s)
        self.admin = ModelAdmin(scheduler, self.workers)

    # -- inference --------------------------------------------------------------------

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        # The request's id here is made here, never taken from the request: a caller-chosen
        # id could collide with another caller's.  It is derived from the tenant and the
        # gateway's (server-made) id in the metadata, so a request the gateway sends again
        # through another coordinator finds its place in the shared queue (Redis adopts
        # it); a continuation, or a call without that id, gets a fresh one.
        tenant = Tenant.of(context)
        rid = request_id_of(context)
        request.request_id = _task_id(tenant, rid) if rid and not request.HasField("resume") \
            else uuid.uuid4().hex
        rid = rid or request.request_id
        started, outcome, label = time.perf_counter(), "ok", "(unknown)"
        try:
            # Another tenant's fine-tuned model reads exactly as a missing one.
            await self.scheduler.check_model(request.model, tenant.sees)
            label = request.model  # a metric label only once it names a real model
            # A resumed generation is the rest of one: never a whole answer to cache; and
            # the cache keeps text, not the logprobs a request may ask for.
            cacheable = self.cache.enabled and is_deterministic(request) \
                and not request.HasField("resume") and not request.sampling.HasField("top_logprobs")
            key = cache_key(request, tenant.subject) if cacheable else None
            cached = await self.cache.get(key) if key else None
            if cached is not None:
                outcome = "cached"
                for msg in _replay(cached):
                    yield msg
                return
            if request.idempotency_key:
                result = await self._idempotent(request, tenant, key, rid)
                for msg in _replay(result, cached=False):
                    yield msg
                return
            async for msg in self._run(request, key, rid):
                yield msg
        except errors.CyllmError as exc:
            outcome = exc.code
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:  # the edge turns it into a status (Redis gone: 503)
            outcome = err.code if (err := unreachable(exc)) else "internal"
            raise
        finally:
            self.metrics.requests.labels(label, outcome).inc()
            # One record per request at INFO is the gateway's access log; a generation
            # that went as asked is a DEBUG record here (and on the worker).
            level = logging.DEBUG if outcome in ("ok", "cached") else logging.INFO
            log.log(level, "generation %s", outcome, extra={
                "request_id": rid, "model": request.model, "outcome": outcome,
                "latency_ms": round((time.perf_counter() - started) * 1000, 1)})

    async def _idempotent(self, request: pb.GenerateRequest, tenant: Tenant, key: str | None,
                          rid: str) -> CachedResponse:
        """The one generation for the request's Idempotency-Key, run detached from this
        caller (see ``idempotency.py``), its whole result."""
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise errors.InvalidRequest(f"{IDEMPOTENCY} is longer than {MAX_IDEMPOTENCY_KEY} "
                                        "characters", param=IDEMPOTENCY)
        return await self.idempotency.run(
            scoped(tenant.subject, request.idempotency_key), cache_key(request, tenant.subject),
            lambda: _collect(self._run(request, key, rid)))

    async def _run(self, request: pb.GenerateRequest, key: str | None,
                   rid: str) -> AsyncIterator[pb.GenerateResponse]:
        task = Task(request.request_id, request.model, request.priority, affinity_key(request))
        relay = Relay(request)
        failed: set[str] = set()
        for attempt in range(1, self.attempts + 1):
            exclude = failed | self.breakers.open_peers()
            if failed:  # every worker for it unhealthy: say so now, not after the queue wait
                await self.scheduler.check_model(request.model)
                exclude = await self._avoid(request.model, exclude)
            waited = time.perf_counter()
            worker = await self.scheduler.acquire(task, exclude=exclude)
            self.metrics.queue_wait.labels(request.model).observe(time.perf_counter() - waited)
            # Each run has its own engine request id: a hung worker may still hold the last.
            upstream = relay.continuation()
            upstream.request_id = uuid.uuid4().hex
            stream = self.workers.generate(worker.address, upstream, rid)
            log.debug("request %s -> worker %s", rid, worker.worker_id, extra={"request_id": rid})
            renewer = asyncio.create_task(self._renew(task)) if self.scheduler.leased else None
            released = False
            try:
                async for msg in _paced(stream, self.progress_timeout_s, worker.worker_id):
                    if not relay.pass_on(msg):
                        continue
                    if msg.HasField("finished") and key and msg.finished.finish_reason != "abort":
                        # The worker is done: free its slot now, with the answer stored in
                        # the cache in the same round trip, before the client sees the end
                        # (so the same request sent at once finds it).
                        released = True
                        await self._release(task, worker.worker_id, Keep(
                            self.cache, key, _to_cached(relay.text, msg.finished)))
                    yield msg
                self.breakers.succeeded(worker.worker_id)
                return
            except _NOT_THE_WORKERS_FAULT:
                self.breakers.succeeded(worker.worker_id)
                raise
            except errors.CyllmError as err:
                self.breakers.failed(worker.worker_id)
                if not isinstance(err, errors.Unavailable) or attempt == self.attempts \
                        or not relay.resumable:
                    raise
                kind = "resumed" if relay.resuming else "retried"
                log.warning("worker %s failed (%s); %s on another after %d tokens",
                            worker.worker_id, err.message, kind, len(relay.ids),
                            extra={"request_id": rid})
                failed.add(worker.worker_id)
                self.metrics.retries.labels(kind).inc()
            except BaseException:
                self.breakers.failed(worker.worker_id)
                raise
            finally:
                if renewer is not None:
                    renewer.cancel()
                stream.cancel()
                if not released:
                    await self._release(task, worker.worker_id)
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S)) - 1])

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        """Embeddings on a worker serving the model, under a slot as a generation holds one;
        a worker that fails or is unreachable hands the call to another."""
        tenant, rid = Tenant.of(context), request_id_of(context)
        await self.scheduler.check_model(request.model, tenant.sees)
        task = Task(uuid.uuid4().hex, request.model)
        failed: set[str] = set()
        for attempt in range(1, self.attempts + 1):
            exclude = failed | self.breakers.open_peers()
            if failed:  # as in _run: only a retry reads the pool to choose whom to avoid
                exclude = await self._avoid(request.model, exclude)
            worker = await self.scheduler.acquire(task, exclude=exclude)
            try:
                reply = await self.workers.embed(worker.address, request, rid or task.task_id)
                self.breakers.succeeded(worker.worker_id)
                return reply
            except errors.Unavailable as err:
                self.breakers.failed(worker.worker_id)
                failed.add(worker.worker_id)
                if attempt == self.attempts:
                    raise
                log.warning("worker %s failed embeddings (%s); trying another", worker.worker_id,
                            err.message, extra={"request_id": rid})
            finally:
                await self._release(task, worker.worker_id)
            await asyncio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S)) - 1])
        raise errors.Unavailable("no worker made the embeddings")

    async def _avoid(self, model: str, bad: set[str]) -> set[str]:
        """Workers to skip: those that failed this request (or whose circuit is open),
        unless no other healthy worker serves the model; then waiting for one of them
        to come back (a restarted worker keeps its id) beats waiting for nothing."""
        others = [v for v in await self.scheduler.workers()
                  if v.healthy and v.record.serves(model) and v.record.worker_id not in bad]
        return bad if others else set()

    async def _release(self, task: Task, worker_id: str, keep: Keep | None = None) -> None:
        """Free the slot (and store ``keep`` in the cache); if the shared state is
        unreachable just now, the task's lease lapses and any coordinator frees it later:
        the generation itself is done (an answer not cached is only a later miss)."""
        try:
            await self.scheduler.release(task, worker_id, keep)
        except Exception as exc:  # noqa: BLE001  (Redis gone; the lease covers it)
            log.warning("could not release the slot of %s on %s: %s", task.task_id, worker_id, exc)

    async def _renew(self, task: Task) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.scheduler.renew(task)
            except Exception as exc:  # noqa: BLE001  (Redis gone a moment: try again)
                log.warning("could not renew the lease of %s: %s", task.task_id, exc)

    # -- discovery --------------------------------------------------------------------

    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=await self.visible_models(Tenant.of(context)))

    async def visible_models(self, tenant: Tenant) -> list[pb.ModelInfo]:
        owners = await self.training.store.model_owners()
        return [m for m in await self.scheduler.models() if tenant.sees(owners.get(m.id, PUBLIC))]

    async def LoadModel(self, request, context) -> pb.LoadModelResponse:
        reply = await self.admin.load(request)
        log.info("model %s loaded on %s (evicted: %s)", request.model, reply.worker_id,
                 list(reply.evicted) or "none")
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

    # -- the worker side --------------------------------------------------------------

    async def RegisterWorker(self, request, context) -> pb.RegisterWorkerResponse:
        if not request.worker.worker_id or not request.worker.address:
            raise errors.InvalidRequest("worker_id and address are required")
        await self.scheduler.register(request.worker)
        log.info("worker %s registered at %s serving %s", request.worker.worker_id,
                 request.worker.address, [m.id for m in request.worker.models])
        return pb.RegisterWorkerResponse(heartbeat_interval_s=self.heartbeat_interval_s)

    async def Heartbeat(self, request, context) -> pb.HeartbeatResponse:
        known = await self.scheduler.heartbeat(request.worker_id, request.running,
                                               request.tokens_generated)
        return pb.HeartbeatResponse(known=known)

    async def DeregisterWorker(self, request, context) -> pb.DeregisterWorkerResponse:
        await self.scheduler.deregister(request.worker_id)
        log.info("worker %s deregistered", request.worker_id)
        return pb.DeregisterWorkerResponse()

    async def close(self) -> None:
        await self.workers.close()


async def _paced(stream: SessionCall, timeout_s: float,
                 worker_id: str) -> AsyncIterator[pb.GenerateResponse]:
    """The worker's stream; a worker silent for ``timeout_s`` is given up on."""
    iterator = aiter(stream)
    silence = Deadline()
    try:
        while True:
            try:
                msg = await silence.wait(anext(iterator), within=timeout_s)
            except StopAsyncIteration:
                return
            except Expired:
                raise errors.Unavailable(
                    f"worker {worker_id} produced nothing for {timeout_s:g}s"
                ) from None
            except errors.Unavailable as err:
                if worker_id in err.message:
                    raise
                raise errors.Unavailable(f"worker {worker_id} became unreachable: {err.message}") from None
            yield msg
    finally:
        silence.close()


def _task_id(tenant: Tenant, gateway_request_id: str) -> str:
    return hashlib.sha256(f"{tenant.subject}\0{gateway_request_id}".encode()).hexdigest()[:32]


def _to_cached(chunks: list[str], finished: pb.Finished) -> CachedResponse:
    return CachedResponse(tuple(chunks), finished.finish_reason, finished.prompt_tokens,
                          finished.completion_tokens)


async def _collect(events: AsyncIterator[pb.GenerateResponse]) -> CachedResponse:
    chunks: list[str] = []
    async with aclosing(events) as stream:
        async for msg in stream:
            kind = msg.WhichOneof("event")
            if kind == "delta":
                chunks.append(msg.delta.text)
            elif kind == "finished":
                return _to_cached(chunks, msg.finished)
    raise errors.EngineError("the generation ended without finishing")


def _replay(entry: CachedResponse, cached: bool = True) -> list[pb.GenerateResponse]:
    msgs = [pb.GenerateResponse(started=pb.Started(prompt_tokens=entry.prompt_tokens, cached=cached))]
    msgs += [pb.GenerateResponse(delta=pb.Delta(text=c)) for c in entry.chunks]
    msgs.append(pb.GenerateResponse(finished=pb.Finished(
        finish_reason=entry.finish_reason, prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens)))
    return msgs
