"""A servicer called in its caller's process, as its gRPC clients would call it.

A gateway that hosts its coordinator (``gateway.embedded_coordinator``) reaches it
through :class:`LocalStub` instead of a channel: one Python gRPC call costs about as
much CPU as everything else a request does in a process, so the hop it saves is most of
the latency the stack adds (see docs/benchmarks.md).  What a caller can observe stays
that of the gRPC plane, so the typed client on top (``gateway/client.py``) is the same:

* the servicer gets its own copy of the request and the caller's metadata;
* the deadline (``timeout``) ends the call with the error a deadline over gRPC gives;
* a failure arrives as the caller would have received it across the wire
  (``status.as_received``): the server's edge translation (``server.ours``), then the
  error's code — a servicer's own ``Unreachable`` about *its* peers reads as plain
  ``Unavailable``, as it would at a remote caller, so it never looks like this stub
  being unreachable;
* leaving a stream early, or ``cancel()``, closes the servicer's generator at once, so
  its ``finally`` (a slot released, an upstream call cancelled) runs as gRPC's
  cancellation would make it run.

No authentication happens here: the caller is this process.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, Callable
from types import AsyncGeneratorType
from typing import Any

from cyllm import errors
from cyllm.protocol import status
from cyllm.protocol.deadline import Deadline, Expired
from cyllm.protocol.server import Translate, explained

Metadata = tuple[tuple[str, str], ...]


class LocalContext:
    """The part of ``grpc.aio.ServicerContext`` the project's servicers read."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> Metadata:
        return self._metadata


class LocalStub:
    """``stub.Method(request, timeout=..., metadata=...)`` on ``servicer`` in-process:
    unary methods return an awaitable reply, streaming ones a :class:`LocalCall`."""

    def __init__(self, servicer: object, translate: Translate) -> None:
        self._servicer = servicer
        self._translate = translate

    def __getattr__(self, name: str) -> Callable[..., Any]:
        behaviour = getattr(self._servicer, name)
        streaming = inspect.isasyncgenfunction(behaviour)

        def call(request: Any, timeout: float | None = None, metadata: Metadata = ()) -> Any:
            context = LocalContext(tuple(metadata or ()))
            if hasattr(request, "CopyFrom"):  # a message: the servicer's own copy
                mine = type(request)()
                mine.CopyFrom(request)
                request = mine
            if streaming:
                return LocalCall(behaviour(request, context), timeout, self._translate)
            return self._unary(behaviour(request, context), timeout)

        return call

    async def _unary(self, reply: Any, timeout: float | None) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await reply
        except TimeoutError:
            raise errors.Unavailable("deadline exceeded") from None
        except Exception as exc:
            raise status.as_received(explained(exc, self._translate)) from None


class LocalCall:
    """A streaming call in-process: iterate it once; ``cancel()`` ends it."""

    def __init__(
        self, replies: AsyncGeneratorType[Any, None], timeout: float | None, translate: Translate
    ) -> None:
        self._replies = replies
        self._deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        self._translate = translate
        self._cancelled = False
        self._closed = False  # the generator closed by its reader
        self._closing: asyncio.Future[None] | None = None  # or by cancel()

    def cancel(self) -> None:
        """End the call.  The servicer's generator is closed now, or, when it is running
        (being read by another task), as soon as it yields; its reader then gets
        ``RequestCancelled``, as a cancelled gRPC call's reader gets CANCELLED."""
        self._cancelled = True
        if not self._closed and self._closing is None and not self._replies.ag_running:
            self._closing = asyncio.ensure_future(self._replies.aclose())

    async def __aiter__(self) -> AsyncGenerator[Any, None]:
        # Each wait is bounded by what is left of the call's deadline: the servicer
        # runs in this task, so the deadline cancels it where it waits.
        deadline = Deadline(self._deadline)
        try:
            while not self._cancelled:
                try:
                    reply = await deadline.wait(anext(self._replies))
                except StopAsyncIteration:
                    return
                except Expired:
                    raise errors.Unavailable("deadline exceeded") from None
                except Exception as exc:
                    raise status.as_received(explained(exc, self._translate)) from None
                if self._cancelled:
                    break
                yield reply
            raise errors.RequestCancelled("the call was cancelled")
        finally:
            deadline.close()
            self._cancelled = True
            if self._closing is not None:
                await self._closing
            elif not self._closed:
                self._closed = True
                await self._replies.aclose()
