"""The serving side of the internal gRPC plane: every server (coordinator, worker) is
made by :func:`create_server`, which puts one interceptor in front of every handler.

The interceptor is the server's edge: a handler raises the project's errors and the
interceptor ends the call with the status ``status.py`` maps them to — once for the
whole server, instead of a ``try`` in each handler.  A process may name foreign
exceptions that are ours to explain (``translate``: the coordinator's Redis gone is
"unavailable", not an internal error).  It also authenticates every call
against the process's :class:`~cyllm.protocol.plane.Plane` before the handler runs:
a refused caller gets a bare UNAUTHENTICATED and nothing of the handler runs.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cyllm import errors
from cyllm.protocol import status
from cyllm.protocol.plane import SERVER_OPTIONS, Plane

Guard = Callable[[grpc.aio.ServicerContext], Awaitable[None]]
Translate = Callable[[Exception], "errors.CyllmError | None"]
log = logging.getLogger(__name__)


def untranslated(exc: Exception) -> None:
    """The translation of a process that explains no foreign exception."""
    return None


def create_server(plane: Plane, translate: Translate = untranslated) -> grpc.aio.Server:
    # so_reuseport off: a second process must not silently share a port already bound.
    return grpc.aio.server(
        interceptors=[EdgeInterceptor(plane, translate)], options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS]
    )


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, plane: Plane, translate: Translate = untranslated) -> None:
        self.plane = plane
        self.translate = translate
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # by method: built once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
                return handler
            wrapped = self._wrapped[details.method] = _translated(
                handler, self._guard(details.method), self.translate
            )
        return wrapped

    def _guard(self, method: str) -> Guard:
        async def guard(context: grpc.aio.ServicerContext) -> None:
            refused = self.plane.check(method, context)
            if refused is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"internal plane: {refused}")

        return guard


def _translated(handler: grpc.RpcMethodHandler, guard: Guard, translate: Translate) -> grpc.RpcMethodHandler:
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, guard, translate), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, guard, translate), **codec
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, guard, translate), **codec)
    return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream, guard, translate), **codec)


def ours(exc: Exception, translate: Translate) -> errors.CyllmError | None:
    """``exc`` as the project's error, or None when it is not ours to explain."""
    return exc if isinstance(exc, errors.CyllmError) else translate(exc)


def explained(exc: Exception, translate: Translate) -> errors.CyllmError:
    """``exc`` as the project's error, a bug included: what a handler's unexpected
    exception becomes where no gRPC server answers for it (an in-process call, a call
    of a session) — logged, and the engine error a caller gets from gRPC's UNKNOWN."""
    err = ours(exc, translate)
    if err is None:
        log.error("unexpected error in a handler", exc_info=exc)
        err = errors.EngineError(f"Unexpected {type(exc).__name__}: {exc}")
    return err


def _unary(
    behaviour: Callable[..., Awaitable[Any]], guard: Guard, translate: Translate
) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await guard(context)
        try:
            return await behaviour(request, context)
        except Exception as exc:
            if (err := ours(exc, translate)) is None:
                raise
            await status.abort(context, err)

    return call


def _streaming(behaviour: Callable[..., Any], guard: Guard, translate: Translate) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behaviour):
        return _unary(behaviour, guard, translate)  # writes with context.write (gRPC health)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await guard(context)
        try:
            async for reply in behaviour(request, context):
                yield reply
        except Exception as exc:
            if (err := ours(exc, translate)) is None:
                raise
            await status.abort(context, err)

    return call
