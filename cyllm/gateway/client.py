"""The gateway's client for the coordinators (gRPC), errors translated at this edge.

Several coordinators may be configured; a request goes to the next one in turn, and
one that cannot be reached (before any answer) is skipped for the next.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import grpc

from cyllm import errors
from cyllm.protocol import pb, rpc, status


class CoordinatorClient:
    def __init__(self, addresses: list[str], timeout_s: float = 600.0) -> None:
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._channels = [grpc.aio.insecure_channel(a) for a in self.addresses]
        self._stubs = [rpc.CoordinatorStub(c) for c in self._channels]
        self._turn = itertools.count()

    def _in_turn(self) -> list[tuple[str, rpc.CoordinatorStub]]:
        start = next(self._turn) % len(self._stubs)
        order = list(zip(self.addresses, self._stubs))
        return order[start:] + order[:start]

    async def generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the coordinator's events; the call is cancelled when this is closed."""
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        for _, stub in self._in_turn():
            call = stub.Generate(request, timeout=self.timeout_s)
            received = False
            try:
                async for msg in call:
                    received = True
                    yield msg
                return
            except grpc.aio.AioRpcError as exc:
                last = status.from_grpc(exc)
                if received or not _unreachable(exc):
                    raise last from None
            finally:
                call.cancel()
        raise last

    async def list_models(self) -> list[pb.ModelInfo]:
        reply = await self._unary("ListModels", pb.ListModelsRequest())
        return list(reply.models)

    async def cluster_status(self) -> list[tuple[str, pb.ClusterStatusResponse | None]]:
        """Every coordinator's view (None where it cannot be reached)."""
        out: list[tuple[str, pb.ClusterStatusResponse | None]] = []
        for address, stub in zip(self.addresses, self._stubs):
            try:
                out.append((address, await stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=3)))
            except grpc.aio.AioRpcError:
                out.append((address, None))
        return out

    async def _unary(self, method: str, request):
        last: errors.CyllmError = errors.Unavailable("no coordinator configured")
        for _, stub in self._in_turn():
            try:
                return await getattr(stub, method)(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                last = status.from_grpc(exc)
                if not _unreachable(exc):
                    raise last from None
        raise last

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


def _unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """A transport failure (not an answer): worth trying another coordinator."""
    keys = {k for k, _ in (exc.trailing_metadata() or ())}
    return exc.code() == grpc.StatusCode.UNAVAILABLE and status.ERROR_KEY not in keys
