"""The calling side of the internal gRPC plane: channels are opened here, and a failed
call becomes the project's error here (``status.from_grpc``), once, so the typed
clients built on it (the gateway's ``CoordinatorClient``, the coordinator's
``WorkerClients``, the worker's registration) never see a gRPC exception.  Channels
carry the process's credentials of the internal plane (``plane.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import grpc

from cyllm.protocol import status
from cyllm.protocol.plane import Plane

T = TypeVar("T")


def open_channel(address: str, plane: Plane) -> grpc.aio.Channel:
    return plane.channel(address)


async def unary(method: Callable[..., Awaitable[T]], request: Any, **kwargs: Any) -> T:
    """Call a unary RPC; its failure arrives as the error the peer raised."""
    try:
        return await method(request, **kwargs)
    except grpc.aio.AioRpcError as exc:
        raise status.from_grpc(exc) from None


class Stream(Generic[T]):
    """A call that streams replies: iterate it (a failure arrives as the error the peer
    raised); ``cancel()`` may come from another task; leaving the iteration cancels it."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> None:
        self._call.cancel()

    async def __aiter__(self) -> AsyncGenerator[T, None]:
        replies = aiter(self._call)
        try:
            async for reply in replies:
                yield reply
        except grpc.aio.AioRpcError as exc:
            raise status.from_grpc(exc) from None
        finally:
            # closed before this returns: an in-process call's servicer (protocol.local)
            # then ends in this task, as the reader leaves
            if (aclose := getattr(replies, "aclose", None)) is not None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await aclose()
            self._call.cancel()
