"""The gateway's client for the coordinators: typed calls over gRPC, failures arriving
as the project's errors (``protocol.client``).

Several coordinators may be configured; each call goes to them in turn, through
``protocol.failover``: a coordinator that cannot be reached is skipped for the next
(one with an open circuit is tried only after the others), and a generation whose
coordinator dies mid-stream continues through another from the tokens already relayed
(``protocol.relay``): the caller sees one stream.  Unary calls have a 10 s timeout
(training calls 60 s), generations ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from starlette.requests import HTTPConnection

from cyllm import errors, tracing
from cyllm.gateway.context import context
from cyllm.protocol import failover, pb, rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.client import Stream, open_channel, unary
from cyllm.protocol.local import LocalStub
from cyllm.protocol.plane import Plane
from cyllm.protocol.relay import Relay
from cyllm.protocol.server import Translate
from cyllm.protocol.tenant import Tenant
from cyllm.runtime import REQUEST_ID

T = TypeVar("T")

# A coordinator that cannot be reached (never one that answered, even with an error)
# sends the call to the next, and counts against its circuit.
RULE = failover.Rule(
    moves_on=(errors.Unreachable,), blames=lambda exc: isinstance(exc, errors.Unreachable), what="coordinator"
)


@dataclass(frozen=True)
class Coordinator:
    """One coordinator's services, over gRPC or in this process."""

    inference: Any
    models: Any
    training: Any
    files: Any
    responses: Any
    batches: Any
    usage: Any

    @classmethod
    def over(cls, channel: grpc.aio.Channel) -> Coordinator:
        return cls(
            rpc.InferenceStub(channel),
            rpc.ModelsStub(channel),
            rpc.TrainingStub(channel),
            rpc.FilesStub(channel),
            rpc.ResponsesStub(channel),
            rpc.BatchesStub(channel),
            rpc.UsageStub(channel),
        )

    @classmethod
    def hosted(cls, services: Any, translate: Translate) -> Coordinator:
        """The coordinator hosted in this process (its ``Services``)."""
        return cls(
            *(
                LocalStub(getattr(services, name), translate)
                for name in ("inference", "models", "training", "files", "responses", "batches", "usage")
            )
        )


Method = Callable[[Coordinator], Callable[..., Awaitable[T]]]


class CoordinatorClient:
    def __init__(
        self,
        addresses: list[str],
        plane: Plane,
        timeout_s: float = 600.0,
        breaker_failures: int = 3,
        breaker_cooldown_s: float = 10.0,
        local: Coordinator | None = None,
    ) -> None:
        """``local``: the coordinator hosted in this process (``embedded_coordinator``),
        then the only one called; ``addresses`` names it (its gRPC address)."""
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._channels = [] if local else [open_channel(a, plane) for a in self.addresses]
        coordinators = [local] if local else [Coordinator.over(c) for c in self._channels]
        self._peers = [failover.Named(a, c) for a, c in zip(self.addresses, coordinators)]
        self._turn = itertools.count()
        self.breakers = CircuitBreakers(breaker_failures, breaker_cooldown_s)
        self._meta: tuple[tuple[str, str], ...] = ()  # whose calls these are
        # The cluster view on its way, in a dict so that ``acting_for``'s views share it
        # (a copied attribute would keep a finished answer for ever).
        self._status: dict[str, asyncio.Future[Any]] = {}
        # Whether a reader that lags must merge the deltas itself (``coalesce.py``): over
        # gRPC a window's worth of small messages would wait unmerged; a hosted
        # coordinator's stream is the worker session's, which merges what its reader
        # has not taken yet (``session.SessionCall``).
        self.unmerged = local is None

    def acting_for(self, tenant: Tenant) -> CoordinatorClient:
        """This client (same channels and breakers) making its calls for ``tenant``: the
        coordinator keeps each tenant's files, jobs and models apart by it."""
        view = copy.copy(self)
        view._meta = tenant.metadata()
        return view

    def _in_turn(self, rounds: int = 1) -> failover.InTurn[Coordinator]:
        """Each coordinator ``rounds`` times, starting with the next in turn."""
        return failover.InTurn(self._peers, self.breakers, next(self._turn), rounds)

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        """``request_id`` travels in the gRPC metadata, into the coordinator's and
        worker's logs."""
        return (((REQUEST_ID, request_id),) if request_id else ()) + self._meta

    # -- generation -------------------------------------------------------------------

    def generate(
        self, request: pb.GenerateRequest, request_id: str = ""
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """The coordinator's events; closing this cancels the call.  Each coordinator
        once, then once more each: a restarted one may be back.  Its ``traceparent``, when
        tracing is on, travels in the metadata too (the W3C way across gRPC)."""
        metadata = self._metadata(request_id)
        if request.traceparent:
            metadata += ((tracing.TRACEPARENT, request.traceparent),)
        relay = Relay(request)

        def call(peer: failover.Named[Coordinator]) -> AsyncGenerator[pb.GenerateResponse, None]:
            return aiter(
                Stream(
                    peer.target.inference.Generate(
                        relay.continuation(), timeout=self.timeout_s, metadata=metadata
                    )
                )
            )

        return failover.stream(
            self._in_turn(rounds=2), call, RULE, breakers=self.breakers, progress=relay, request_id=request_id
        )

    async def embed(
        self, model: str, texts: list[str], dimensions: int, request_id: str, priority: int = 0
    ) -> pb.EmbedResponse:
        request = pb.EmbedRequest(
            request_id=request_id, model=model, inputs=texts, dimensions=dimensions, priority=priority
        )
        return await self._unary(
            lambda c: c.inference.Embed, request, timeout=self.timeout_s, request_id=request_id
        )

    async def tokenize(self, request: pb.TokenizeRequest, request_id: str) -> pb.TokenizeResponse:
        return await self._unary(lambda c: c.inference.Tokenize, request, timeout=60, request_id=request_id)

    # -- models -----------------------------------------------------------------------

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self._unary(lambda c: c.models.ListModels, pb.ListModelsRequest())
        return list(reply.models)

    async def load_model(
        self, model: str, adapter_path: str = "", worker_id: str = ""
    ) -> pb.LoadModelResponse:
        # Loading may start an engine (vLLM: about a minute on CPU) or convert a GGUF.
        return await self._unary(
            lambda c: c.models.LoadModel,
            pb.LoadModelRequest(model=model, adapter_path=adapter_path, worker_id=worker_id),
            timeout=900,
        )

    async def unload_model(self, model: str) -> pb.UnloadModelResponse:
        return await self._unary(
            lambda c: c.models.UnloadModel, pb.UnloadModelRequest(model=model), timeout=300
        )

    async def delete_model(self, model: str) -> pb.DeleteModelResponse:
        return await self._unary(lambda c: c.models.DeleteModel, pb.ModelRequest(model=model), timeout=300)

    async def publish_model(self, request: pb.PublishModelRequest) -> pb.ModelInfo:
        return await self._unary(lambda c: c.models.PublishModel, request)

    async def export_model(self, model: str) -> AsyncIterator[pb.FileChunk]:
        """The artefact's tar stream, from the first coordinator in turn (a stream read
        once, not started again elsewhere)."""
        peer = await self._in_turn().take(frozenset())
        if peer is None:
            raise errors.Unavailable("no coordinator configured")
        call: Stream[pb.FileChunk] = Stream(
            peer.target.models.ExportModel(pb.ModelRequest(model=model), metadata=self._meta)
        )
        async for chunk in call:
            yield chunk

    async def alias(self, op: str, request: pb.AliasRequest) -> pb.Alias:
        """``op``: SetAlias, GetAlias or DeleteAlias."""
        return await self._unary(lambda c: getattr(c.models, op), request)

    async def list_aliases(self) -> list[pb.Alias]:
        reply = await self._unary(lambda c: c.models.ListAliases, pb.ListAliasesRequest())
        return list(reply.aliases)

    async def cluster_status(self) -> list[tuple[str, pb.ClusterStatusResponse | None]]:
        """Every coordinator's view (None where it cannot be reached), asked of all at
        once.  The health route that asks is public: callers that come while an answer
        is on its way share it, so a flood of them costs each coordinator one call at a
        time, and an answer is never older than the wait for it."""
        flight = self._status.get("flight")
        if flight is None:
            flight = self._status["flight"] = asyncio.ensure_future(self._ask_status())
            flight.add_done_callback(lambda _: self._status.pop("flight", None))
        return await asyncio.shield(flight)  # one caller leaving does not end it for all

    async def _ask_status(self) -> list[tuple[str, pb.ClusterStatusResponse | None]]:
        async def one(peer: failover.Named[Coordinator]) -> pb.ClusterStatusResponse | None:
            try:
                return await unary(peer.target.models.ClusterStatus, pb.ClusterStatusRequest(), timeout=3)
            except errors.CyllmError:
                return None

        return list(zip(self.addresses, await asyncio.gather(*map(one, self._peers))))

    # -- training jobs ----------------------------------------------------------------

    async def create_training_job(
        self, spec_json: str, training_file: str = "", validation_file: str = "", budget_s: float = 0.0
    ) -> pb.TrainingJob:
        """``budget_s``: the caller's training device-seconds per month (0: none)."""
        return await self._training(
            lambda c: c.training.CreateTrainingJob,
            pb.CreateTrainingJobRequest(
                spec_json=spec_json,
                training_file=training_file,
                validation_file=validation_file,
                device_seconds_per_month=budget_s,
            ),
        )

    async def get_training_job(self, job_id: str) -> pb.TrainingJob:
        return await self._training(lambda c: c.training.GetTrainingJob, pb.TrainingJobRequest(id=job_id))

    async def list_training_jobs(self, limit: int, after: str = "") -> pb.ListTrainingJobsResponse:
        return await self._training(
            lambda c: c.training.ListTrainingJobs, pb.ListTrainingJobsRequest(limit=limit, after=after)
        )

    async def cancel_training_job(self, job_id: str) -> pb.TrainingJob:
        return await self._training(lambda c: c.training.CancelTrainingJob, pb.TrainingJobRequest(id=job_id))

    async def list_training_events(self, job_id: str) -> list[pb.TrainingEvent]:
        reply = await self._training(
            lambda c: c.training.ListTrainingEvents, pb.TrainingEventsRequest(id=job_id)
        )
        return list(reply.events)

    def watch_training(self, job_id: str, after_seq: int = 0) -> AsyncGenerator[pb.TrainingEvent, None]:
        """A job's events; a coordinator lost mid-watch is replaced by the next, from the
        last event seen (the events are shared in Redis)."""
        cursor = _Cursor(after_seq)

        def call(peer: failover.Named[Coordinator]) -> AsyncGenerator[pb.TrainingEvent, None]:
            return aiter(
                Stream(
                    peer.target.training.WatchTrainingJob(
                        pb.TrainingEventsRequest(id=job_id, after_seq=cursor.seq), metadata=self._meta
                    )
                )
            )

        return failover.stream(self._in_turn(rounds=2), call, RULE, breakers=self.breakers, progress=cursor)

    # -- files ------------------------------------------------------------------------

    async def upload_file(self, chunks: AsyncIterator[pb.FileChunk]) -> pb.FileInfo:
        """To the first coordinator in turn only: the chunks cannot be sent twice."""
        peer = await self._in_turn().take(frozenset())
        if peer is None:
            raise errors.Unavailable("no coordinator configured")
        return await unary(peer.target.files.UploadFile, chunks, timeout=3600, metadata=self._meta)

    async def get_file(self, file_id: str) -> pb.FileInfo:
        return await self._training(lambda c: c.files.GetFile, pb.FileRequest(id=file_id))

    async def list_files(self, purpose: str = "") -> list[pb.FileInfo]:
        reply = await self._training(lambda c: c.files.ListFiles, pb.ListFilesRequest(purpose=purpose))
        return list(reply.files)

    async def delete_file(self, file_id: str) -> None:
        await self._training(lambda c: c.files.DeleteFile, pb.FileRequest(id=file_id))

    def read_file(self, file_id: str, offset: int = 0) -> AsyncGenerator[pb.FileChunk, None]:
        """The file's bytes from ``offset``; a coordinator lost mid-read is replaced by
        the next, from the bytes already read."""
        cursor = _Offset(offset)

        def call(peer: failover.Named[Coordinator]) -> AsyncGenerator[pb.FileChunk, None]:
            return aiter(
                Stream(
                    peer.target.files.ReadFile(
                        pb.ReadFileRequest(id=file_id, offset=cursor.offset), metadata=self._meta
                    )
                )
            )

        return failover.stream(self._in_turn(rounds=2), call, RULE, breakers=self.breakers, progress=cursor)

    # -- batches ------------------------------------------------------------------------

    async def batch(self, op: str, request: Any) -> Any:
        """``op``: a method of the Batches service (CreateBatch, GetBatch, ...)."""
        return await self._training(lambda c: getattr(c.batches, op), request)

    # -- stored responses ---------------------------------------------------------------

    async def put_response(self, stored: pb.StoredResponse) -> pb.StoredResponse:
        return await self._training(lambda c: c.responses.PutResponse, stored)

    async def get_response(self, response_id: str) -> pb.StoredResponse:
        return await self._training(
            lambda c: c.responses.GetResponse, pb.StoredResponseRequest(id=response_id)
        )

    async def delete_response(self, response_id: str) -> bool:
        reply = await self._training(
            lambda c: c.responses.DeleteResponse, pb.StoredResponseRequest(id=response_id)
        )
        return reply.deleted

    # -- the usage ledger ---------------------------------------------------------------

    async def record_usage(self, rows: list[pb.UsageRow]) -> None:
        await self._unary(lambda c: c.usage.RecordUsage, pb.UsageRecords(rows=rows))

    async def query_usage(self, query: pb.UsageQuery) -> pb.UsageReport:
        return await self._training(lambda c: c.usage.QueryUsage, query)

    async def spent_since(self, subject: str, since: int) -> tuple[int, float]:
        """What the ledger has of ``subject`` since ``since``: (tokens, device-seconds)."""
        reply = await self._unary(lambda c: c.usage.Spent, pb.BudgetSpent(subject=subject, since=since))
        return reply.tokens, reply.device_seconds

    # -- plumbing ---------------------------------------------------------------------

    async def _training(self, method: Method[T], request: Any) -> T:
        return await self._unary(method, request, timeout=60)

    async def _unary(self, method: Method[T], request: Any, timeout: float = 10, request_id: str = "") -> T:
        """``method`` of the first coordinator in turn that can be reached."""
        metadata = self._metadata(request_id)
        return await failover.unary(
            self._in_turn(),
            lambda peer: unary(method(peer.target), request, timeout=timeout, metadata=metadata),
            RULE,
            breakers=self.breakers,
            request_id=request_id,
        )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class _Cursor:
    """A training watch's progress: the last event seen, from which the next
    coordinator continues (any coordinator has every event)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def pass_on(self, event: pb.TrainingEvent) -> bool:
        if event.seq and event.seq <= self.seq:
            return False
        self.seq = max(self.seq, event.seq)
        return True

    resumable = True
    resuming = False


class _Offset:
    """A file read's progress: the bytes relayed, from which the next coordinator
    continues (the files are on storage every coordinator mounts)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def pass_on(self, chunk: pb.FileChunk) -> bool:
        self.offset += len(chunk.data)
        return True

    resumable = True
    resuming = False


def coordinator(conn: HTTPConnection) -> CoordinatorClient:
    """The coordinator client, acting for this request's caller."""
    return conn.app.state.client.acting_for(context(conn).caller.tenant)
