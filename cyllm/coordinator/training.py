"""Training jobs on the coordinator: accept, queue, hand to a worker, follow, resume,
and serve the result.

1. ``create`` checks the spec, the base model and (when this machine can read it) the
   dataset, stores the job as ``queued`` and wakes the dispatcher.
2. The dispatcher gives each queued job to an idle healthy worker that trains and has
   the base model in its catalog (one job per worker), taking a lease on it.
3. ``_follow`` streams the worker's events into the job store (progress, checkpoints,
   log lines) while renewing the lease and watching the cancel flag.
4. The end: success registers what was trained as a model on that worker
   (``<base>:ft-…`` for a LoRA adapter served beside its base, ``<base>-ft-…`` for a
   model of its own; its last checkpoints as ``…-step-N``, loaded when asked for); a
   worker lost mid-run (or a coordinator whose lease ran out) puts
   the job back in the queue to resume from its last checkpoint, up to
   ``training_max_attempts`` runs; a cancel stops the worker's process.
5. Promotion (``promote_to``): before training, the worker scores the alias's current
   target (the incumbent) on the job's validation data; after it, the result.  The
   alias moves to the result only if its loss is lower and the alias still points
   where it did when it was scored (one atomic move, recorded) — the platform's gate,
   not the job's; ``job.promotion`` says what happened and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator

from cyllm import errors, tracing
from cyllm.coordinator.datasets import DatasetPolicy
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.jobs import TERMINAL, JobStore
from cyllm.coordinator.ledger import Ledger
from cyllm.coordinator.registry import ModelRecord, Registry, served_as
from cyllm.coordinator.scheduler import Scheduler, WorkerView
from cyllm.coordinator.training_meter import QUOTA_CODE, Meter, record_end
from cyllm.coordinator.workers import WorkerClients
from cyllm.paths import is_id
from cyllm.protocol import pb
from cyllm.protocol.client import Stream
from cyllm.protocol.tenant import Tenant
from cyllm.training import methods
from cyllm.training.spec import TrainingSpec
from cyllm.training.verdict import verdict

log = logging.getLogger(__name__)

# How a Train call that ends in an error is read: the worker went away (or failed
# under the job) -> run the job again elsewhere; any other error is the job's own.
_LOST = (errors.Unavailable, errors.RequestCancelled, errors.EngineError)


class TrainingManager:
    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        scheduler: Scheduler,
        workers: WorkerClients,
        registry: Registry,
        coordinator_id: str,
        *,
        lease_s: float,
        max_attempts: int,
        datasets: DatasetPolicy | None = None,
        max_jobs_per_tenant: int = 4,
        max_steps: int = 100_000,
        max_time_s: float = 86_400.0,
        ledger: Ledger | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.files = files
        self.datasets = datasets or DatasetPolicy()
        self.max_jobs_per_tenant = max_jobs_per_tenant
        self.max_steps = max_steps
        self.max_time_s = max_time_s
        self.scheduler = scheduler
        self.workers = workers
        self.registry = registry
        self.owner = coordinator_id
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._running: dict[str, tuple[asyncio.Task[None], str]] = {}  # job -> (task, worker)
        self._kick = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        await self.store.start()
        self._dispatcher = asyncio.create_task(self._dispatch_forever())

    async def close(self) -> None:
        """Stop following jobs; each goes back to the queue (to resume from its checkpoint)."""
        self._closing = True
        tasks = [t for t, _ in self._running.values()]
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
        for t in tasks:
            t.cancel()
        if tasks:  # bounded: a shutdown must not wait on a stuck store call
            await asyncio.wait(tasks, timeout=10)
        try:
            await asyncio.wait_for(self.store.close(), 5)
        except Exception:
            log.warning("training job store did not close cleanly", exc_info=True)

    # -- the API --------------------------------------------------------------------------

    async def create(
        self, request: pb.CreateTrainingJobRequest, tenant: Tenant, visible: set[str]
    ) -> pb.TrainingJob:
        """``visible``: the model ids this tenant may use (a base model must be one)."""
        try:
            raw = json.loads(request.spec_json or "{}")
        except json.JSONDecodeError as exc:
            raise errors.InvalidRequest(f"the training spec is not JSON: {exc.msg}") from None
        if not isinstance(raw, dict):
            raise errors.InvalidRequest("the training spec must be a JSON object")
        uploaded = held_out = None
        if request.training_file:
            uploaded = await self.files.get(request.training_file, tenant, "training_file")
            raw["dataset"] = uploaded.path
        if request.validation_file:
            held_out = await self.files.get(request.validation_file, tenant, "validation_file")
            raw["validation_dataset"] = held_out.path
        spec = TrainingSpec.parse(raw)
        if spec.eval_steps is not None and spec.validation_dataset is None:
            raise errors.InvalidRequest(
                "eval_steps needs validation data (a validation file or validation_dataset)",
                param="eval_steps",
            )
        if spec.promote_to is not None:
            if spec.validation_dataset is None:
                raise errors.InvalidRequest(
                    "promote_to needs validation data (a validation file or validation_dataset): "
                    "the result is promoted only if its loss there is lower",
                    param="promote_to",
                )
            await self._incumbent(tenant.subject, spec)  # refused now if it cannot compare
        tenant.check_model(spec.base_model)  # the key's allow-list, again
        if spec.base_model not in visible:
            raise errors.ModelNotFound(
                f"base model {spec.base_model!r} is not served by any "
                "worker; GET /v1/models lists the models you can use",
                param="model",
            )
        await self._check_room(spec)
        if spec.max_steps is not None and spec.max_steps > self.max_steps:
            raise errors.InvalidRequest(
                f"max_steps: at most {self.max_steps} on this server", param="max_steps"
            )
        # the tenant's cap before its data is read (a read is a child process of up to
        # a gigabyte and two minutes)
        active = [j for j in await self._owned(tenant.subject) if j.state not in TERMINAL]
        if len(active) >= self.max_jobs_per_tenant:
            raise errors.Overloaded(
                f"{len(active)} of your training jobs are queued or running; "
                f"at most {self.max_jobs_per_tenant} at once",
                retry_after=60,
            )
        # the split read of a validation dataset that is the dataset itself, said before
        # either is replaced by the local path it is read from
        if spec.validation_dataset is not None:
            spec.validation_split = spec.split_of("validation_dataset")
        # An upload was read when it came, as whatever kind of records it holds; it is
        # read again as this job reads it (its objective, format and columns).
        if spec.method != "custom":
            spec.dataset = await self.datasets.admit(spec, "dataset", tenant, uploaded is not None)
        if spec.validation_dataset is not None:
            spec.validation_dataset = await self.datasets.admit(
                spec, "validation_dataset", tenant, held_out is not None
            )
        spec.time_limit_s = min(spec.time_limit_s or self.max_time_s, self.max_time_s)
        job = pb.TrainingJob(
            id=f"ftjob-{uuid.uuid4().hex[:24]}",
            spec_json=spec.model_dump_json(),
            state="queued",
            created_at=int(time.time()),
            training_file=request.training_file,
            owner=tenant.subject,
            validation_file=request.validation_file,
            device_seconds_per_month=_cap(request.device_seconds_per_month),
        )
        await self.store.put(job)
        await self._event(job.id, "state", f"job created: {spec.method} on {spec.base_model}", state="queued")
        await self.store.enqueue(job.id)
        self._kick.set()
        return job

    async def get(self, job_id: str, tenant: Tenant | None = None) -> pb.TrainingJob:
        """The job; for a ``tenant``, only its own (another's reads as missing)."""
        # A malformed id names nothing: the same 404 as an unknown one.
        job = await self.store.get(job_id) if is_id(job_id) else None
        if job is None or (tenant is not None and not tenant.owns(job.owner)):
            raise errors.NotFound(f"training job {job_id!r} does not exist", param="id")
        return job

    async def page(self, tenant: Tenant, limit: int, after: str) -> tuple[list[pb.TrainingJob], bool]:
        if tenant.admin:
            return await self.store.page(limit, after)
        if after:
            try:
                await self.get(after, tenant)
            except errors.NotFound:  # as the store does for an unknown cursor
                return [], False
        mine = await self._owned(tenant.subject, after)
        return mine[:limit], len(mine) > limit

    async def _owned(self, owner: str, after: str = "") -> list[pb.TrainingJob]:
        """Newest first, read page by page."""
        out: list[pb.TrainingJob] = []
        more = True
        while more:
            page, more = await self.store.page(200, after)
            out += [j for j in page if j.owner == owner]
            after = page[-1].id if page else ""
            more = more and bool(page)
        return out

    async def cancel(self, job_id: str, tenant: Tenant) -> pb.TrainingJob:
        job = await self.get(job_id, tenant)
        if job.state in TERMINAL:
            raise errors.InvalidRequest(f"training job {job_id} has already {job.state}")
        await self.store.request_cancel(job_id)
        if await self.store.dequeue(job_id):
            return await self._finish(job, "cancelled", "cancelled before it started")
        local = self._running.get(job_id)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the coordinator running it stops the worker
            job = await self.get(job_id)
            if job.state in TERMINAL or (local is not None and local[0].done()):
                break
            await asyncio.sleep(0.2)
        return await self.get(job_id)

    async def watch(self, job_id: str, after_seq: int, tenant: Tenant) -> AsyncIterator[pb.TrainingEvent]:
        """Events after ``after_seq`` as they come, until the job has ended."""
        await self.get(job_id, tenant)
        while True:
            events = await self.store.events(job_id, after_seq)
            for event in events:
                after_seq = event.seq
                yield event
            if not events and (await self.get(job_id)).state in TERMINAL:
                return
            await asyncio.sleep(0.25)

    # -- dispatching ----------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while not self._closing:
            try:
                await self._dispatch()
            except Exception:  # the store unreachable for a moment: keep trying
                log.exception("training dispatch failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), 0.5)
            self._kick.clear()

    async def _dispatch(self) -> None:
        for job_id in await self.store.expired():  # its coordinator is gone
            if job_id not in self._running:
                await self.store.release(job_id)
                job = await self.store.get(job_id)
                if job is not None and job.state == "running":
                    await self._requeue(job, "the coordinator following it was lost")
        queued = await self.store.queued()
        if not queued:
            return
        idle = [v for v in await self.scheduler.workers() if self._idle(v)]
        for job_id in queued:
            job = await self.store.get(job_id)
            if job is None:
                await self.store.dequeue(job_id)
                continue
            spec = TrainingSpec.model_validate_json(job.spec_json)
            fits = [v for v in idle if _fits(v.record.info, spec)]
            if not fits or not await self.store.claim(job_id, self.owner, self.lease_s):
                continue
            view = fits[0]
            idle.remove(view)
            task = asyncio.create_task(self._follow(job_id, view.record.info))
            self._running[job_id] = (task, view.record.worker_id)
            task.add_done_callback(functools.partial(self._ended, job_id))

    async def _check_room(self, spec: TrainingSpec) -> None:
        """InvalidRequest when the training workers there are all have fewer devices than
        the job's processes (none registered yet: it waits for one)."""
        trainers = [v.record.info for v in await self.scheduler.workers() if v.record.info.trains]
        if trainers and not any(_enough(info, spec) for info in trainers):
            most = max(info.training_devices or 1 for info in trainers)
            raise errors.InvalidRequest(
                f"processes: {spec.processes}, but the training workers have at most {most} devices each",
                param="processes",
            )

    def _idle(self, view: WorkerView) -> bool:
        info = view.record.info
        mine = {w for _, w in self._running.values()}
        return view.healthy and info.trains and not info.training_job and info.worker_id not in mine

    def _ended(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(job_id, None)
        self._kick.set()

    # -- following a job on its worker ------------------------------------------------------

    async def _follow(self, job_id: str, worker: pb.WorkerInfo) -> None:
        job = await self.get(job_id)
        job.state, job.worker_id = "running", worker.worker_id
        job.attempts += 1
        job.started_at = job.started_at or int(time.time())
        resume = job.checkpoints[-1].path if job.checkpoints else ""
        spec = TrainingSpec.model_validate_json(job.spec_json)
        meter = Meter(self.ledger, job, spec)
        if spent := await meter.spent():  # by its owner's other jobs, or its own earlier runs
            await self._finish(await self.get(job_id), "failed", spent, code=QUOTA_CODE)
            await self.store.release(job_id)
            return
        incumbent = await self._incumbent_of(job, spec)
        await self.store.put(job)
        await self._event(
            job_id,
            "state",
            f"running on worker {worker.worker_id}"
            + (f", resuming from step {job.checkpoints[-1].step}" if resume else ""),
            state="running",
        )
        # One trace per run of a job (a run starts long after the request that queued it).
        span = tracing.start(
            "training.run",
            None,
            "internal",
            **{"cyllm.job_id": job_id, "cyllm.attempt": job.attempts, "cyllm.worker": worker.worker_id},
        )
        call = self.workers.train(
            worker.address,
            pb.TrainRequest(
                job_id=job_id,
                spec_json=job.spec_json,
                resume_from=resume,
                incumbent_json=json.dumps(incumbent) if incumbent else "",
                traceparent=tracing.traceparent(span),
            ),
        )
        stop = _Stop()
        keeper = asyncio.create_task(self._keep(job_id, call, stop, meter))
        try:
            await self._run(job_id, worker, call, stop)
        except asyncio.CancelledError:
            # stopped after the run (serving or promoting its result): the lease, kept,
            # runs out and the job is taken up again (coordinator lost)
            keeper.cancel()
            await meter.record()
            raise
        finally:
            tracing.end(span)
        keeper.cancel()  # renewed until the job's end is recorded, not only the run's
        await meter.record()
        await self.store.release(job_id)

    async def _run(
        self, job_id: str, worker: pb.WorkerInfo, call: Stream[pb.TrainingEvent], stop: _Stop
    ) -> None:
        final: pb.TrainingEvent | None = None
        result: pb.TrainingEvent | None = None
        try:
            async for event in call:
                if event.type == "state":
                    final = event
                    continue
                if event.type == "result":
                    result = event
                await self._record(job_id, event)
        except asyncio.CancelledError:
            if stop.is_set():
                await stop.finish(self, await self.get(job_id))
                return
            await self._requeue(await self.get(job_id), "this coordinator is shutting down")
            await self.store.release(job_id)
            raise
        except errors.CyllmError as err:
            job = await self.get(job_id)
            if stop.is_set():
                await stop.finish(self, job)
            elif isinstance(err, errors.Overloaded):  # the worker took another job
                job.attempts -= 1
                await self._requeue(job, err.message or "worker busy")
            elif isinstance(err, _LOST):
                await self._requeue(job, f"worker {worker.worker_id} was lost ({err.code}: {err.message})")
            else:
                await self._finish(job, "failed", err.message, code=err.code)
            return
        finally:
            call.cancel()
        job = await self.get(job_id)
        if stop.is_set():
            await stop.finish(self, job)
        elif final is None or final.state != "succeeded":
            await self._finish(
                job,
                "failed",
                final.message if final else "the worker ended the job without a result",
                code="training_failed",
            )
        else:
            await self._succeed(job, worker, result)

    async def _keep(self, job_id: str, call: Stream[pb.TrainingEvent], stop: _Stop, meter: Meter) -> None:
        """Renew the lease; stop the worker's run when a cancel is requested anywhere or
        the owner's budget is spent; put the run's device-seconds in the usage ledger as
        they accrue."""
        while True:
            await asyncio.sleep(min(1.0, self.lease_s / 3))
            if await self.store.cancel_requested(job_id):
                stop.set("cancelled", "cancelled while running")
                call.cancel()
                return
            await self.store.renew(job_id, self.owner, self.lease_s)
            if meter.due():
                await meter.record()
                if spent := await meter.spent():
                    stop.set("failed", f"stopped: {spent}", QUOTA_CODE)
                    call.cancel()
                    return

    async def _record(self, job_id: str, event: pb.TrainingEvent) -> None:
        if event.type in ("metrics", "eval", "evaluation", "checkpoint", "result"):
            job = await self.get(job_id)
            if event.type == "metrics":
                eval_loss = job.progress.eval_loss if job.progress.HasField("eval_loss") else None
                job.progress.CopyFrom(event.progress)
                if eval_loss is not None:
                    job.progress.eval_loss = eval_loss
                job.trained_tokens = max(job.trained_tokens, event.progress.tokens)
            elif event.type == "eval":
                job.progress.eval_loss = event.progress.eval_loss
            elif event.type == "evaluation":
                job.evaluation.update(event.scores)
            elif event.type == "checkpoint":
                job.checkpoints.append(event.checkpoint)
                job.checkpoints[-1].loss = job.progress.loss
            else:
                job.trained_tokens = max(job.trained_tokens, event.trained_tokens)
            await self.store.put(job)
        await self.store.append_event(job_id, event)

    async def _succeed(
        self, job: pb.TrainingJob, worker: pb.WorkerInfo, result: pb.TrainingEvent | None
    ) -> None:
        if result is None:  # a custom script that produced nothing to serve
            await self._finish(job, "succeeded", "training finished (no model to serve)")
            return
        spec = TrainingSpec.model_validate_json(job.spec_json)
        name = "ft-" + (f"{spec.suffix}-" if spec.suffix else "") + job.id[-8:]
        for kind in (result.result_kind, "peft"):  # an id is never taken twice (ids are short)
            if await self.registry.taken(served_as(spec.base_model, name, kind)):
                name = "ft-" + (f"{spec.suffix}-" if spec.suffix else "") + job.id.removeprefix("ftjob-")
        kinds = [result.result_kind]
        if result.result_kind == "adapter":
            # An engine that takes no adapters at run time (vLLM started without LoRA)
            # serves the base with the adapter applied, as a model of its own.
            kinds.append("peft")
        failure: errors.CyllmError
        for kind in kinds:
            record = ModelRecord(
                served_as(spec.base_model, name, kind),
                job.owner,
                spec.base_model,
                kind,
                result.result_path,
                job_id=job.id,
                keep_alive_s=spec.keep_alive_s,
                evaluation={
                    k.removeprefix("result."): v for k, v in job.evaluation.items() if k.startswith("result.")
                },
            )
            await self.registry.put(record)  # before anyone can see it
            try:
                reply = await self.workers.load_model(worker.address, record.load_request())
                break
            except errors.NotLoadable as err:
                await self.registry.delete(record.id)
                if kind != kinds[-1]:
                    log.info("job %s: %s; serving the adapter applied instead", job.id, err.message)
                    continue
                failure = err
            except errors.CyllmError as err:
                await self.registry.delete(record.id)
                failure = err
            await self._finish(
                job,
                "failed",
                f"trained ({result.result_path}), but serving it failed: {failure.message}",
                code=failure.code,
            )
            return
        await self.scheduler.register(reply.worker)
        job.fine_tuned_model = record.id
        if spec.method not in methods.UNSERVABLE_CHECKPOINTS:
            for checkpoint in job.checkpoints[-methods.CHECKPOINTS_KEPT :]:  # the ones on disk
                kept = dataclasses.replace(
                    record,
                    id=served_as(spec.base_model, f"{name}-step-{checkpoint.step}", record.kind),
                    path=checkpoint.path,
                    evaluation={},
                )
                await self.registry.put(kept)  # loaded when asked for
                checkpoint.model = kept.id
        if spec.promote_to is not None:
            job.promotion = await self._promote(job, spec.promote_to, record)
            await self._event(job.id, "promotion", job.promotion)
        judged = verdict(dict(job.evaluation))
        if judged:
            await self._event(job.id, "message", judged, level="warning" if "worse" in judged else "info")
        await self._finish(job, "succeeded", f"training finished; serving it as {record.id}")

    # -- promotion: the platform's gate, not the job's --------------------------------------

    async def _incumbent(self, owner: str, spec: TrainingSpec) -> dict[str, str] | None:
        """What the result must beat: the alias's target, if it has one (None: the alias
        is new, so the result is promoted unless its training failed).  A target not made
        from this job's base cannot be compared on its losses: refused."""
        assert spec.promote_to is not None
        target = await self.registry.alias(owner, spec.promote_to)
        if target is None:
            return None
        if target == spec.base_model:
            return {"model": target, "kind": "base"}
        record = await self.registry.get(target)
        if record is not None and not Tenant(owner).sees(record.visibility):
            record = None  # no longer published to the job's owner: not its to evaluate
        if record is None or record.base != spec.base_model:
            raise errors.InvalidRequest(
                f"promote_to: alias {spec.promote_to!r} points at {target!r}, which is not "
                f"{spec.base_model!r} or a model made from it; losses of other models do not compare",
                param="promote_to",
            )
        return {"model": target, "kind": record.kind, "path": record.path}

    async def _incumbent_of(self, job: pb.TrainingJob, spec: TrainingSpec) -> dict[str, str] | None:
        """The incumbent this run evaluates (None when it was already scored, or there is
        none); ``job.incumbent`` names it."""
        if spec.promote_to is None:
            return None
        try:
            incumbent = await self._incumbent(job.owner, spec)
        except errors.InvalidRequest:  # the alias moved to something else: the gate says so
            job.incumbent = await self.registry.alias(job.owner, spec.promote_to) or ""
            job.evaluation.pop("incumbent.eval_loss", None)
            return None
        name = incumbent["model"] if incumbent else ""
        if name == job.incumbent and ("incumbent.eval_loss" in job.evaluation or not name):
            return None  # scored on an earlier run
        job.incumbent = name
        job.evaluation.pop("incumbent.eval_loss", None)
        return incumbent

    async def _promote(self, job: pb.TrainingJob, alias: str, record: ModelRecord) -> str:
        """Point ``alias`` at the result if it beats the alias's target on the job's
        validation data, atomically (refused if the alias moved since it was scored)."""
        mine = job.evaluation.get("result.eval_loss")
        if mine is None:
            return f"not promoted to {alias}: the result has no evaluation loss"
        now = await self.registry.alias(job.owner, alias) or ""
        if now != job.incumbent:
            return f"not promoted to {alias}: it moved to {now or 'nothing'} during training"
        theirs = job.evaluation.get("incumbent.eval_loss")
        if now and theirs is None:
            return f"not promoted to {alias}: its target {now} could not be evaluated"
        if theirs is not None and not mine < theirs:
            return (
                f"not promoted to {alias}: evaluation loss {mine:.4f} is not below "
                f"{theirs:.4f} of its target {now}"
            )
        why = f"{job.id}: evaluation loss {mine:.4f}" + (f" < {theirs:.4f} of {now}" if now else "")
        try:
            await self.registry.move(job.owner, alias, record.id, job.owner, why, expect=now)
        except errors.InvalidRequest:
            return f"not promoted to {alias}: it moved while the result was being promoted"
        return f"promoted to {alias} ({why})"

    async def _requeue(self, job: pb.TrainingJob, why: str) -> None:
        if job.attempts >= self.max_attempts:
            await self._finish(
                job, "failed", f"{why}; gave up after {job.attempts} runs", code="training_failed"
            )
            return
        job.state, job.worker_id = "queued", ""
        await self.store.put(job)
        where = f"step {job.checkpoints[-1].step}" if job.checkpoints else "the start"
        await self._event(
            job.id, "state", f"{why}; re-queued, will resume from {where}", state="queued", level="warn"
        )
        await self.store.enqueue(job.id)
        self._kick.set()

    async def _finish(self, job: pb.TrainingJob, state: str, message: str, code: str = "") -> pb.TrainingJob:
        job.state, job.finished_at = state, int(time.time())
        if state == "failed":
            job.error, job.error_code = message, code or "training_failed"
        await self.store.put(job)
        await self._event(
            job.id, "state", message, state=state, level="error" if state == "failed" else "info"
        )
        await record_end(self.ledger, job)
        return job

    async def _event(
        self, job_id: str, type_: str, message: str, *, state: str = "", level: str = "info"
    ) -> None:
        await self.store.append_event(
            job_id,
            pb.TrainingEvent(
                created_at=int(time.time() * 1000), type=type_, level=level, message=message, state=state
            ),
        )


@dataclasses.dataclass
class _Stop:
    """Why a run is being stopped from here, once it is: a cancel, or a spent budget."""

    event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    state: str = "cancelled"
    message: str = ""
    code: str = ""

    def set(self, state: str, message: str, code: str = "") -> None:
        self.state, self.message, self.code = state, message, code
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    async def finish(self, manager: TrainingManager, job: pb.TrainingJob) -> None:
        await manager._finish(job, self.state, self.message, code=self.code)


def _cap(seconds: float) -> float:
    """A budget as the gateway passed it; anything but a positive number is none."""
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def _enough(info: pb.WorkerInfo, spec: TrainingSpec) -> bool:
    """Whether a worker has the devices (GPUs, NPUs, or CPU cores) for the job's
    processes; devices: all takes whatever the worker has."""
    return spec.devices == "all" or (info.training_devices or 1) >= spec.processes


def _fits(info: pb.WorkerInfo, spec: TrainingSpec) -> bool:
    has_base = any(m.id == spec.base_model for m in list(info.models) + list(info.available))
    return has_base and _enough(info, spec)
