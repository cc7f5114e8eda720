"""The gateway's client for the coordinators: typed calls over gRPC, failures arriving
as the project's errors (``protocol.client``).

Several coordinators may be configured; a call goes to the next one in turn, and one
that cannot be reached is skipped for the next.  A generation whose coordinator dies
mid-stream continues through another from the tokens already relayed
(``protocol.relay``): the caller sees one stream.  Each coordinator
has a circuit breaker (``protocol.breaker``): after ``breaker_failures`` unreachable
answers it is tried only after the others for ``breaker_cooldown_s``.  Unary calls have
a 10 s timeout (training calls 60 s), generations ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from cyllm import errors
from cyllm.protocol import pb, rpc
from cyllm.protocol.breaker import CircuitBreakers
from cyllm.protocol.client import Stream, open_channel, unary
from cyllm.protocol.local import LocalStub
from cyllm.protocol.plane import Plane
from cyllm.protocol.relay import Relay
from cyllm.protocol.tenant import Tenant
from cyllm.runtime import REQUEST_ID

log = logging.getLogger(__name__)

T = TypeVar("T")
Method = Callable[[rpc.CoordinatorStub], Callable[..., Awaitable[T]]]


class CoordinatorClient:
    def __init__(self, addresses: list[str], plane: Plane, timeout_s: float = 600.0,
                 breaker_failures: int = 3, breaker_cooldown_s: float = 10.0,
                 local: LocalStub | None = None) -> None:
        """``local``: the coordinator hosted in this process (``embedded_coordinator``),
        then the only one called; ``addresses`` names it (its gRPC address)."""
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._channels = [] if local else [open_channel(a, plane) for a in self.addresses]
        self._stubs: list[Any] = [local] if local else [rpc.CoordinatorStub(c) for c in self._channels]
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

    def _in_turn(self) -> list[tuple[str, rpc.CoordinatorStub]]:
        start = next(self._turn) % len(self._stubs)
        order = list(zip(self.addresses, self._stubs))
        order = order[start:] + order[:start]
        closed = [o for o in order if not self.breakers.is_open(o[0])]
        return closed + [o for o in order if o not in closed]  # open circuits only as a last resort

    # -- generation -------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest,
                       request_id: str = "") -> AsyncIterator[pb.GenerateResponse]:
        """Stream the coordinator's events; the call is cancelled when this is closed.
        ``request_id`` travels in the gRPC metadata, into the coordinator's and worker's logs."""
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        metadata = (((REQUEST_ID, request_id),) if request_id else ()) + self._meta
        relay = Relay(request)
        # Each coordinator once, then once more each: a restarted one may be back.
        for address, stub in self._in_turn() * 2:
            upstream = relay.continuation()
            stream = Stream(stub.Generate(upstream, timeout=self.timeout_s, metadata=metadata))
            received = False
            try:
                async for msg in stream:
                    if not received:
                        received = True
                        self.breakers.succeeded(address)
                    if relay.pass_on(msg):
                        yield msg
                return
            except errors.Unreachable as exc:
                self.breakers.failed(address)
                if not relay.resumable:
                    raise
                if relay.resuming:
                    log.warning("coordinator %s unreachable mid-generation (%s); continuing "
                                "through the next after %d tokens", address, exc.message,
                                len(relay.ids), extra={"request_id": request_id})
                last = exc
            finally:
                stream.cancel()
        raise last

    # -- models -----------------------------------------------------------------------

    async def embed(self, request: pb.EmbedRequest, request_id: str) -> pb.EmbedResponse:
        return await self._unary(lambda s: s.Embed, request, timeout=self.timeout_s,
                                 request_id=request_id)

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self._unary(lambda s: s.ListModels, pb.ListModelsRequest())
        return list(reply.models)

    async def load_model(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        # Loading may start an engine (vLLM: about a minute on CPU) or convert a GGUF.
        return await self._unary(lambda s: s.LoadModel, request, timeout=900)

    async def unload_model(self, request: pb.UnloadModelRequest) -> pb.UnloadModelResponse:
        return await self._unary(lambda s: s.UnloadModel, request, timeout=300)

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
        async def one(stub: Any) -> pb.ClusterStatusResponse | None:
            try:
                return await unary(stub.ClusterStatus, pb.ClusterStatusRequest(), timeout=3)
            except errors.CyllmError:
                return None

        return list(zip(self.addresses, await asyncio.gather(*map(one, self._stubs))))

    # -- training jobs ----------------------------------------------------------------

    async def create_training_job(self, spec_json: str, training_file: str = "",
                                  validation_file: str = "") -> pb.TrainingJob:
        return await self._training(lambda s: s.CreateTrainingJob, pb.CreateTrainingJobRequest(
            spec_json=spec_json, training_file=training_file, validation_file=validation_file))

    async def get_training_job(self, job_id: str) -> pb.TrainingJob:
        return await self._training(lambda s: s.GetTrainingJob, pb.TrainingJobRequest(id=job_id))

    async def list_training_jobs(self, limit: int, after: str = "") -> pb.ListTrainingJobsResponse:
        return await self._training(lambda s: s.ListTrainingJobs,
                                    pb.ListTrainingJobsRequest(limit=limit, after=after))

    async def cancel_training_job(self, job_id: str) -> pb.TrainingJob:
        return await self._training(lambda s: s.CancelTrainingJob, pb.TrainingJobRequest(id=job_id))

    async def list_training_events(self, job_id: str) -> list[pb.TrainingEvent]:
        reply = await self._training(lambda s: s.ListTrainingEvents,
                                     pb.TrainingEventsRequest(id=job_id))
        return list(reply.events)

    async def watch_training(self, job_id: str, after_seq: int = 0) -> AsyncIterator[pb.TrainingEvent]:
        """A job's events; a coordinator lost mid-watch is replaced by the next, from the
        last event seen (the events are shared in Redis)."""
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        for address, stub in self._in_turn() * 2:
            stream = Stream(stub.WatchTrainingJob(
                pb.TrainingEventsRequest(id=job_id, after_seq=after_seq), metadata=self._meta))
            try:
                async for event in stream:
                    after_seq = max(after_seq, event.seq)
                    yield event
                return
            except errors.Unreachable as exc:
                self.breakers.failed(address)
                last = exc
            finally:
                stream.cancel()
        raise last

    # -- files ------------------------------------------------------------------------

    async def upload_file(self, chunks: AsyncIterator[pb.FileChunk]) -> pb.FileInfo:
        _, stub = self._in_turn()[0]
        return await unary(stub.UploadFile, chunks, timeout=3600, metadata=self._meta)

    async def get_file(self, file_id: str) -> pb.FileInfo:
        return await self._training(lambda s: s.GetFile, pb.FileRequest(id=file_id))

    async def list_files(self, purpose: str = "") -> list[pb.FileInfo]:
        reply = await self._training(lambda s: s.ListFiles, pb.ListFilesRequest(purpose=purpose))
        return list(reply.files)

    async def delete_file(self, file_id: str) -> None:
        await self._training(lambda s: s.DeleteFile, pb.FileRequest(id=file_id))

    # -- plumbing ---------------------------------------------------------------------

    async def _training(self, method: Method[T], request: Any) -> T:
        return await self._unary(method, request, timeout=60)

    async def _unary(self, method: Method[T], request: Any, timeout: float = 10,
                     request_id: str = "") -> T:
        """``method`` of the first coordinator in turn that can be reached."""
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        metadata = (((REQUEST_ID, request_id),) if request_id else ()) + self._meta
        for address, stub in self._in_turn():
            try:
                reply = await unary(method(stub), request, timeout=timeout, metadata=metadata)
            except errors.Unreachable as exc:
                self.breakers.failed(address)
                last = exc
                continue
            self.breakers.succeeded(address)
            return reply
        raise last

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
