"""The serving side of the internal gRPC plane: every server (coordinator, worker) is
made by :func:`create_server`, which puts one interceptor in front of every handler.

The interceptor is the server's edge: a handler raises the project's errors and the
interceptor ends the call with the status ``status.py`` maps them to — once for the
whole server, instead of a ``try`` in each handler.  Whatever must hold for every call
(authenticating the caller) belongs here too.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from cyllm import errors
from cyllm.protocol import status


def create_server() -> grpc.aio.Server:
    # so_reuseport off: a second process must not silently share a port already bound.
    return grpc.aio.server(interceptors=[EdgeInterceptor()], options=[("grpc.so_reuseport", 0)])


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # by method: built once

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        wrapped = self._wrapped.get(details.method)
        if wrapped is None:
            handler = await continuation(details)
            if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
                return handler
            wrapped = self._wrapped[details.method] = _translated(handler)
        return wrapped


def _translated(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    codec = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary), **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream), **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream), **codec)


def _unary(behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behaviour(request, context)
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    return call


def _streaming(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(behaviour):
        return _unary(behaviour)  # a handler that writes with context.write (gRPC health)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for reply in behaviour(request, context):
                yield reply
        except errors.CyllmError as exc:
            await status.abort(context, exc)

    return call
