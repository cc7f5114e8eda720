"""``Inference``: generations and embeddings, placed on workers.

A generation is answered from the prompt cache where it may be, else given to the one
run of its ``Idempotency-Key`` where it has one, else run: it waits in the scheduler's
queue for a worker slot and streams from that worker.  A worker that dies, hangs
(nothing for ``progress_timeout_s``) or refuses as unavailable hands the generation to
another, up to ``generation_attempts`` in all (``protocol.failover``, with the worker
slots of :class:`WorkerSlots` as its peers): re-run if nothing was sent yet, resumed
from the tokens sent if something was (``protocol.relay``), so the caller sees one
stream either way.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

import grpc

from cyllm import errors, tracing
from cyllm.coordinator.cache import CachedResponse, PromptCache, cache_key, is_deterministic
from cyllm.coordinator.idempotency import MAX_KEY as MAX_IDEMPOTENCY_KEY
from cyllm.coordinator.idempotency import PARAM as IDEMPOTENCY
from cyllm.coordinator.idempotency import Idempotency, scoped
from cyllm.coordinator.loading import Loader
from cyllm.coordinator.metrics import CoordinatorMetrics
from cyllm.coordinator.queue import Task
from cyllm.coordinator.registry import Registry
from cyllm.coordinator.routing import affinity_key
from cyllm.coordinator.scheduler import Keep, Scheduler
from cyllm.coordinator.workers import WorkerClients
from cyllm.protocol import failover, pb, rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.deadline import Deadline, Expired
from cyllm.protocol.relay import Relay
from cyllm.protocol.session import SessionCall
from cyllm.protocol.tenant import PUBLIC, Tenant
from cyllm.runtime import request_id_of
from cyllm.shared_state import unreachable

log = logging.getLogger(__name__)

# Errors that say nothing against the worker: it answered, or our caller left.
_NOT_THE_WORKERS_FAULT = (
    errors.InvalidRequest,
    errors.NotFound,
    errors.RequestCancelled,
    asyncio.CancelledError,
    GeneratorExit,
)


def worker_rule(attempts: int) -> failover.Rule:
    """Workers: a refusal as unavailable (a dead or hung worker reads as one) moves the
    call on; anything but an answer or a caller leaving counts against the worker.  The
    pauses give a dead worker's missed heartbeats time to show."""
    return failover.Rule(
        moves_on=(errors.Unavailable,),
        blames=lambda exc: not isinstance(exc, _NOT_THE_WORKERS_FAULT),
        attempts=attempts,
        pauses=(0.1, 0.25, 0.5, 1.0, 2.0),
        what="worker",
    )


@dataclass
class Slot:
    """A worker slot held by one attempt of a request."""

    name: str  # the worker's id
    address: str
    task: Task
    released: bool = False
    renewer: asyncio.Task[None] | None = None


class WorkerSlots:
    """The peers of a request among the workers: each attempt waits in the queue for a
    slot on a healthy worker serving the model, skipping those that failed it (and
    those whose circuit is open) while another serves it."""

    def __init__(
        self,
        scheduler: Scheduler,
        breakers: CircuitBreakers,
        task: Task,
        metrics: CoordinatorMetrics | None = None,
        lease_s: float = 0.0,
        label: str = "",
        traceparent: str = "",
    ) -> None:
        """``label``: the model as the metrics name it (``metric_label``); ``traceparent``:
        the span a queue wait is traced under."""
        self.scheduler, self.breakers, self.task = scheduler, breakers, task
        self.metrics, self.lease_s, self.label = metrics, lease_s, label
        self.traceparent = traceparent

    async def take(self, failed: frozenset[str]) -> Slot:
        exclude = set(failed) | self.breakers.open_peers()
        if failed:  # every worker for it unhealthy: say so now, not after the queue wait
            await self.scheduler.check_model(self.task.model)
            exclude = await self._avoid(exclude)
        waited = time.perf_counter()
        with tracing.child(self.traceparent, "queue", **{"cyllm.priority": self.task.priority}) as span:
            worker = await self.scheduler.acquire(self.task, exclude=exclude)
            if span is not None:
                span.set_attribute("cyllm.worker", worker.worker_id)
        if self.metrics is not None:
            self.metrics.queue_wait.labels(self.label).observe(time.perf_counter() - waited)
        slot = Slot(worker.worker_id, worker.address, self.task)
        if self.scheduler.leased and self.lease_s:
            slot.renewer = asyncio.create_task(self._renew())
        return slot

    async def _avoid(self, bad: set[str]) -> set[str]:
        """Workers to skip: those that failed this request (or whose circuit is open),
        unless no other healthy worker serves the model; then waiting for one of them
        to come back (a restarted worker keeps its id) beats waiting for nothing."""
        others = [
            v
            for v in await self.scheduler.workers()
            if v.healthy and v.record.serves(self.task.model) and v.record.worker_id not in bad
        ]
        return bad if others else set()

    async def give_back(self, slot: Slot, keep: Keep | None = None) -> None:
        """Free the slot (and store ``keep`` in the cache); if the shared state is
        unreachable just now, the task's lease lapses and any coordinator frees it later:
        the generation itself is done (an answer not cached is only a later miss)."""
        if slot.renewer is not None:
            slot.renewer.cancel()
        if slot.released:
            return
        slot.released = True
        try:
            await self.scheduler.release(slot.task, slot.name, keep)
        except Exception as exc:
            log.warning("could not release the slot of %s on %s: %s", slot.task.task_id, slot.name, exc)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.scheduler.renew(self.task)
            except Exception as exc:
                log.warning("could not renew the lease of %s: %s", self.task.task_id, exc)


class InferenceService(rpc.InferenceServicer):
    def __init__(
        self,
        scheduler: Scheduler,
        cache: PromptCache,
        workers: WorkerClients,
        breakers: CircuitBreakers,
        metrics: CoordinatorMetrics,
        idempotency: Idempotency,
        *,
        progress_timeout_s: float,
        lease_s: float,
        attempts: int = 6,
        owned_model_names: bool = False,
        registry: Registry,
        loader: Loader,
    ) -> None:
        """``owned_model_names``: metrics name a tenant's own models (else their base)."""
        self.scheduler = scheduler
        self.cache = cache
        self.workers = workers
        self.breakers = breakers
        self.metrics = metrics
        self.idempotency = idempotency
        self.progress_timeout_s = progress_timeout_s
        self.lease_s = lease_s
        self.rule = worker_rule(attempts)
        self.owned_model_names = owned_model_names
        self.registry = registry
        self.loader = loader

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
        tenant.check_model(request.model)  # the key's allow-list, again (it names what callers send)
        request.model = await self._target(request.model, tenant)
        request.request_id = (
            _task_id(tenant, rid) if rid and not request.HasField("resume") else uuid.uuid4().hex
        )
        rid = rid or request.request_id
        request.tenant = hashlib.sha256(tenant.subject.encode()).hexdigest()[:16]
        started, outcome, label = time.perf_counter(), "ok", "(unknown)"
        span = tracing.start(
            "coordinator.generate",
            tracing.of_call(context) or request.traceparent,
            "server",
            **{"cyllm.request_id": rid, "gen_ai.request.model": request.model},
        )
        request.traceparent = tracing.traceparent(span)  # the worker's spans go under it
        try:
            # Another tenant's fine-tuned model reads exactly as a missing one.
            with tracing.child(span, "placement"):
                owner = await self._placed(request.model, tenant)
            # a metric label only once it names a real model, and no tenant's own
            label = metric_label(request.model, owner, self.owned_model_names)
            # A resumed generation is the rest of one: never a whole answer to cache; and
            # the cache keeps text, not the logprobs a request may ask for.
            cacheable = (
                self.cache.enabled
                and is_deterministic(request)
                and not request.HasField("resume")
                and not request.sampling.HasField("top_logprobs")
                and not request.sampling.HasField("prompt_logprobs")
            )
            key = cache_key(request, tenant.subject) if cacheable else None
            with tracing.child(span, "cache", **{"cyllm.cacheable": bool(key)}) as looked:
                cached = await self.cache.get(key) if key else None
                if looked is not None:
                    looked.set_attribute("cyllm.cache_hit", cached is not None)
            if cached is not None:
                outcome = "cached"
                events = _listed(_replay(cached))
            elif request.idempotency_key and request.sampling.HasField("prompt_logprobs"):
                raise errors.InvalidRequest(
                    "Idempotency-Key cannot be combined with a scored prompt (echo, prompt_logprobs): "
                    "a replay keeps the text, not the prompt's logprobs",
                    param="Idempotency-Key",
                )
            elif request.idempotency_key:
                events = _listed(
                    _replay(await self._idempotent(request, tenant, key, rid, label), cached=False)
                )
            else:
                events = self._run(request, key, rid, label)
            async with aclosing(events) as messages:
                async for msg in messages:
                    if msg.HasField("started"):
                        msg.started.model_label = label
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
            tracing.end(
                span, error=None if outcome in ("ok", "cached") else outcome, **{"cyllm.outcome": outcome}
            )
            self.metrics.requests.labels(label, outcome).inc()
            # One record per request at INFO is the gateway's access log; a generation
            # that went as asked is a DEBUG record here (and on the worker).
            level = logging.DEBUG if outcome in ("ok", "cached") else logging.INFO
            log.log(
                level,
                "generation %s",
                outcome,
                extra={
                    "request_id": rid,
                    "model": request.model,
                    "outcome": outcome,
                    "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )

    async def _target(self, model: str, tenant: Tenant) -> str:
        """The model a request names: where the tenant's alias of that name points, or
        the model itself."""
        return await self.registry.resolve(tenant.subject, model) or model

    async def _placed(self, model: str, tenant: Tenant) -> str:
        """The model's owner, once some worker serves it: loaded on demand where no
        worker does (``loading.py``), the request waiting meanwhile."""
        try:
            return await self.scheduler.check_model(model, tenant.sees)
        except errors.ModelNotFound:
            if not await self.loader.ensure(model, tenant):
                raise
        return await self.scheduler.check_model(model, tenant.sees)

    async def _idempotent(
        self, request: pb.GenerateRequest, tenant: Tenant, key: str | None, rid: str, label: str
    ) -> CachedResponse:
        """The one generation for the request's Idempotency-Key, run detached from this
        caller (see ``idempotency.py``), its whole result."""
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise errors.InvalidRequest(
                f"{IDEMPOTENCY} is longer than {MAX_IDEMPOTENCY_KEY} characters", param=IDEMPOTENCY
            )
        return await self.idempotency.run(
            scoped(tenant.subject, request.idempotency_key),
            cache_key(request, tenant.subject),
            lambda: _collect(self._run(request, key, rid, label)),
        )

    def _run(
        self, request: pb.GenerateRequest, key: str | None, rid: str, label: str
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The generation on workers; ``key``: its prompt-cache key, where it may be kept;
        ``label``: the model as the metrics name it."""
        task = Task(request.request_id, request.model, request.priority, affinity_key(request))
        relay = Relay(request)
        slots = WorkerSlots(
            self.scheduler, self.breakers, task, self.metrics, self.lease_s, label, request.traceparent
        )

        def on(slot: Slot) -> AsyncGenerator[pb.GenerateResponse, None]:
            # Each run has its own engine request id: a hung worker may still hold the last.
            upstream = relay.continuation()
            upstream.request_id = uuid.uuid4().hex
            log.debug("request %s -> worker %s", rid, slot.name, extra={"request_id": rid})

            async def finished(end: pb.Finished) -> None:
                if key and end.finish_reason != "abort":
                    # The worker is done: free its slot now, with the answer stored in the
                    # cache in the same round trip, before the client sees the end (so
                    # the same request sent at once finds it).
                    await slots.give_back(slot, Keep(self.cache, key, _to_cached(relay.text, end)))

            return _paced(
                self.workers.generate(slot.address, upstream, rid),
                self.progress_timeout_s,
                slot.name,
                finished,
            )

        def moved(slot: failover.Peer, err: errors.CyllmError, resuming: bool) -> None:
            self.metrics.retries.labels("resumed" if resuming else "retried").inc()

        return failover.stream(
            slots, on, self.rule, breakers=self.breakers, progress=relay, moved=moved, request_id=rid
        )

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        """Embeddings on a worker serving the model, under a slot as a generation holds one;
        a worker that fails or is unreachable hands the call to another."""
        tenant, rid = Tenant.of(context), request_id_of(context)
        tenant.check_model(request.model)
        request.model = await self._target(request.model, tenant)
        await self._placed(request.model, tenant)
        task = Task(uuid.uuid4().hex, request.model, request.priority)
        slots = WorkerSlots(self.scheduler, self.breakers, task)
        return await failover.unary(
            slots,
            lambda slot: self.workers.embed(slot.address, request, rid or task.task_id),
            self.rule,
            breakers=self.breakers,
            request_id=rid,
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """A model's tokenizer on a worker serving it (placed as embeddings are)."""
        tenant, rid = Tenant.of(context), request_id_of(context)
        tenant.check_model(request.model)
        request.model = await self._target(request.model, tenant)
        await self._placed(request.model, tenant)
        task = Task(uuid.uuid4().hex, request.model)
        return await failover.unary(
            WorkerSlots(self.scheduler, self.breakers, task),
            lambda slot: self.workers.tokenize(slot.address, request, rid or task.task_id),
            self.rule,
            breakers=self.breakers,
            request_id=rid,
        )


async def _paced(
    stream: SessionCall,
    timeout_s: float,
    worker_id: str,
    finished: Callable[[pb.Finished], Awaitable[None]] | None = None,
) -> AsyncGenerator[pb.GenerateResponse, None]:
    """The worker's stream; a worker silent for ``timeout_s`` is given up on.
    ``finished`` is told of the end before it is passed on."""
    iterator = aiter(stream)
    silence = Deadline()
    try:
        while True:
            try:
                msg = await silence.wait(anext(iterator), within=timeout_s)
            except StopAsyncIteration:
                return
            except Expired:
                raise errors.Unavailable(f"worker {worker_id} produced nothing for {timeout_s:g}s") from None
            except errors.Unavailable as err:
                if worker_id in err.message:
                    raise
                raise errors.Unavailable(f"worker {worker_id} became unreachable: {err.message}") from None
            if finished is not None and msg.HasField("finished"):
                await finished(msg.finished)
            yield msg
    finally:
        silence.close()
        await iterator.aclose()


def metric_label(model: str, owner: str, named: bool = False) -> str:
    """What metrics call ``model``: its id, unless a tenant owns it (a fine-tuned
    model's id is the tenant's business); then its base, or "fine-tuned"."""
    if owner == PUBLIC or named:
        return model
    base, _, adapter = model.partition(":")
    return base if adapter else "fine-tuned"


async def _listed(messages: list[pb.GenerateResponse]) -> AsyncGenerator[pb.GenerateResponse, None]:
    for msg in messages:
        yield msg


def _task_id(tenant: Tenant, gateway_request_id: str) -> str:
    return hashlib.sha256(f"{tenant.subject}\0{gateway_request_id}".encode()).hexdigest()[:32]


def _to_cached(chunks: list[str], finished: pb.Finished) -> CachedResponse:
    return CachedResponse(
        tuple(chunks), finished.finish_reason, finished.prompt_tokens, finished.completion_tokens
    )


async def _collect(events: AsyncGenerator[pb.GenerateResponse, None]) -> CachedResponse:
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
    msgs.append(
        pb.GenerateResponse(
            finished=pb.Finished(
                finish_reason=entry.finish_reason,
                prompt_tokens=entry.prompt_tokens,
                completion_tokens=entry.completion_tokens,
            )
        )
    )
    return msgs
