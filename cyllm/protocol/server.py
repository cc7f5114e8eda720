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
from dataclasses import dataclass
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


# The largest request of a method whose request is one message (the gRPC plane's
# limit, 64 MiB, is for the streams that batch many): a generation's or a load's may
# carry a long prompt (the gateway bounds what users send far below this), any other
# is small.  Checked before the message is parsed.
LARGE_REQUESTS = {"Generate": 16 << 20, "Embed": 16 << 20, "LoadModel": 1 << 20}
SMALL_REQUEST = 1 << 20


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Credentials first: with the internal token, a call without it is refused from its
    metadata alone, before a byte of its message is parsed (an unauthenticated 60 MB
    message would otherwise be deserialized, and its copies kept, to be refused after).
    A role's certificate is checked as the handler starts (what it may call), and a
    message larger than its method's bound is refused unparsed."""

    def __init__(self, plane: Plane, translate: Translate = untranslated) -> None:
        self.plane = plane
        self.translate = translate
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # built once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        built = self._wrapped.get(details.method)
        if built is None:
            handler = await continuation(details)
            if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
                return handler
            built = self._wrapped[details.method] = (
                _translated(
                    handler, self._guard(details.method), self.translate, _request_limit(details.method)
                ),
                _refusal(handler),
            )
        wrapped, refused = built
        if not self.plane.token_sent(details.method, details.invocation_metadata):
            return refused
        return wrapped

    def _guard(self, method: str) -> Guard:
        async def guard(context: grpc.aio.ServicerContext) -> None:
            refused = self.plane.check(method, context)
            if refused is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"internal plane: {refused}")

        return guard


def _request_limit(method: str) -> int | None:
    name = method.rpartition("/")[2]
    return LARGE_REQUESTS.get(name, SMALL_REQUEST)


@dataclass(frozen=True)
class _TooLarge:
    """A request message left unparsed: it is over its method's bound."""

    size: int
    limit: int


def _bounded(deserialize: Callable[[bytes], Any] | None, limit: int | None) -> Callable[[bytes], Any] | None:
    if deserialize is None or limit is None:
        return deserialize

    def parse(raw: bytes) -> Any:
        return _TooLarge(len(raw), limit) if len(raw) > limit else deserialize(raw)

    return parse


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler``'s shape, refusing the call without reading its message."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "internal plane: missing or wrong internal token"
        )

    codec = {"request_deserializer": lambda raw: None, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, **codec)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse, **codec)


def _translated(
    handler: grpc.RpcMethodHandler, guard: Guard, translate: Translate, limit: int | None = None
) -> grpc.RpcMethodHandler:
    one_request = bool(handler.unary_unary or handler.unary_stream)  # streams have the plane's limit
    codec = {
        "request_deserializer": _bounded(handler.request_deserializer, limit if one_request else None),
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
            _check_size(request)
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
            _check_size(request)
            async for reply in behaviour(request, context):
                yield reply
        except Exception as exc:
            if (err := ours(exc, translate)) is None:
                raise
            await status.abort(context, err)

    return call


def _check_size(request: Any) -> None:
    if isinstance(request, _TooLarge):
        raise errors.InvalidRequest(
            f"a request of {request.size} bytes is over this call's limit of {request.limit} bytes"
        )
