"""The gateway's client for the coordinators (gRPC), errors translated at this edge.

Several coordinators may be configured; a request goes to the next one in turn, and
one that cannot be reached (before any answer) is skipped for the next.  Each
coordinator has a circuit breaker (``purgatory``): after ``breaker_failures``
unreachable answers it is not tried for ``breaker_cooldown_s`` unless no other is left.
Unary calls have a 10 s timeout, generations ``request_timeout_s``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator

import grpc
from purgatory import AsyncCircuitBreakerFactory

from cyllm import errors
from cyllm.protocol import pb, rpc, status
from cyllm.runtime import REQUEST_ID


class CoordinatorClient:
    def __init__(self, addresses: list[str], timeout_s: float = 600.0,
                 breaker_failures: int = 3, breaker_cooldown_s: float = 10.0) -> None:
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self._stubs = [rpc.CoordinatorStub(c) for c in self._channels]
        self._turn = itertools.count()
        self._breakers = AsyncCircuitBreakerFactory(default_threshold=breaker_failures,
                                                    default_ttl=breaker_cooldown_s)
        self._open_until: dict[str, float] = {}

    def _in_turn(self) -> list[tuple[str, rpc.CoordinatorStub]]:
        start = next(self._turn) % len(self._stubs)
        order = list(zip(self.addresses, self._stubs))
        order = order[start:] + order[:start]
        now = time.monotonic()
        closed = [o for o in order if self._open_until.get(o[0], 0) <= now]
        return closed + [o for o in order if o not in closed]  # open circuits only as a last resort

    async def _record(self, address: str, failed: bool) -> None:
        breaker = await self._breakers.get_breaker(address)
        try:
            async with breaker:
                if failed:
                    raise ConnectionError(address)
        except Exception:
            pass  # the breaker counted it (or is open): nothing to raise here
        ctx = breaker.context
        if ctx.state == "opened":
            self._open_until[address] = time.monotonic() + (ctx.opened_at or 0) + ctx.ttl - time.time()
        else:
            self._open_until.pop(address, None)

    async def generate(self, request: pb.GenerateRequest,
                       request_id: str = "") -> AsyncIterator[pb.GenerateResponse]:
        """Stream the coordinator's events; the call is cancelled when this is closed.
        ``request_id`` travels in the gRPC metadata, into the coordinator's and worker's logs."""
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        metadata = ((REQUEST_ID, request_id),) if request_id else None
        for address, stub in self._in_turn():
            call = stub.Generate(request, timeout=self.timeout_s, metadata=metadata)
            received = False
            try:
                async for msg in call:
                    if not received:
                        received = True
                        await self._record(address, failed=False)
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                last = status.from_grpc(exc)
                if received or not _unreachable(exc):
                    raise last from None
                await self._record(address, failed=True)
            finally:
                call.cancel()
        raise last

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self._unary("ListModels", pb.ListModelsRequest())
        return list(reply.models)

    async def load_model(self, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        # Loading may start an engine (vLLM: about a minute on CPU) or convert a GGUF.
        return await self._unary("LoadModel", request, timeout=900)

    async def unload_model(self, request: pb.UnloadModelRequest) -> pb.UnloadModelResponse:
        return await self._unary("UnloadModel", request, timeout=300)

    # -- training and files: unary calls, a watch stream, an upload stream

    async def training(self, method: str, request):
        """A unary training or file call by its RPC name (CreateTrainingJob, GetFile, ...)."""
        return await self._unary(method, request, timeout=60)

    async def watch_training(self, job_id: str, after_seq: int = 0) -> AsyncIterator[pb.TrainingEvent]:
        address, stub = self._in_turn()[0]
        call = stub.WatchTrainingJob(pb.TrainingEventsRequest(id=job_id, after_seq=after_seq))
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            raise status.from_grpc(exc) from None
        finally:
            call.cancel()

    async def upload_file(self, chunks: AsyncIterator[pb.FileChunk]) -> pb.FileInfo:
        _, stub = self._in_turn()[0]
        try:
            return await stub.UploadFile(chunks, timeout=3600)
        except grpc.aio.AioRpcError as exc:
            raise status.from_grpc(exc) from None

    async def cluster_status(self) -> list[tuple[str, pb.ClusterStatusResponse | None]]:
        """Every coordinator's view (None where it cannot be reached)."""
        out: list[tuple[str, pb.ClusterStatusResponse | None]] = []
        for address, stub in zip(self.addresses, self._stubs):
            try:
                out.append((address, await stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=3)))
            except grpc.aio.AioRpcError:
                out.append((address, None))
        return out

    async def _unary(self, method: str, request, timeout: float = 10):
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        for address, stub in self._in_turn():
            try:
                reply = await getattr(stub, method)(request, timeout=timeout)
                await self._record(address, failed=False)
                return reply
            except grpc.aio.AioRpcError as exc:
                last = status.from_grpc(exc)
                if not _unreachable(exc):
                    raise last from None
                await self._record(address, failed=True)
        raise last

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """A transport failure (not an answer): worth trying another coordinator."""
    keys = {k for k, _ in (exc.trailing_metadata() or ())}
    return exc.code() == grpc.StatusCode.UNAVAILABLE and status.ERROR_KEY not in keys
