"""The one place where CY-LLM errors become gRPC statuses and back again."""

from __future__ import annotations

from urllib.parse import quote, unquote

import grpc

from cyllm import errors

ERROR_KEY = "cyllm-error"
RETRY_AFTER_KEY = "retry-after"

# Ordered most specific first: the first isinstance match wins.
_TO_GRPC: list[tuple[type[errors.CyllmError], grpc.StatusCode]] = [
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.Forbidden, grpc.StatusCode.PERMISSION_DENIED),
    (errors.InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.NotLoadable, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.RequestCancelled, grpc.StatusCode.CANCELLED),
    (errors.EngineError, grpc.StatusCode.INTERNAL),
]

_BY_CODE: dict[str, type[errors.CyllmError]] = {
    cls.code: cls
    for cls in (
        errors.Unauthenticated,
        errors.Forbidden,
        errors.InvalidRequest,
        errors.ContextLengthExceeded,
        errors.NotFound,
        errors.ModelNotFound,
        errors.NotLoadable,
        errors.InsufficientMemory,
        errors.Overloaded,
        errors.Unavailable,
        errors.RequestCancelled,
        errors.EngineError,
    )
}

# A status that carries no cyllm-error key came from gRPC itself (a dead peer, a deadline,
# a message over the size limit) or from the plane's authentication (``server.py``): a
# refused credential is this deployment's fault, never the end user's, so it reads as
# unavailable rather than as the caller's 401.
_FROM_BARE_STATUS: dict[grpc.StatusCode, type[errors.CyllmError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unavailable,
    grpc.StatusCode.PERMISSION_DENIED: errors.Unavailable,
    grpc.StatusCode.UNAVAILABLE: errors.Unreachable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Unavailable,
    grpc.StatusCode.CANCELLED: errors.RequestCancelled,
}


def to_grpc(err: errors.CyllmError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Return (status code, details, trailing metadata) for ``err``."""
    code = grpc.StatusCode.INTERNAL
    for cls, status in _TO_GRPC:
        if isinstance(err, cls):
            code = status
            break
    metadata: list[tuple[str, str]] = [(ERROR_KEY, err.code)]
    if err.param:  # a caller-chosen field name may be any text; metadata is printable ASCII
        metadata.append(("cyllm-param", quote(err.param[:200], safe="")))
    if isinstance(err, errors.Overloaded):
        metadata.append((RETRY_AFTER_KEY, f"{err.retry_after:g}"))
    return code, err.message, tuple(metadata)


async def abort(context: grpc.aio.ServicerContext, err: errors.CyllmError) -> None:
    """Finish the RPC in ``context`` with ``err``'s status (raises, as grpc's abort does)."""
    code, details, metadata = to_grpc(err)
    await context.abort(code, details, trailing_metadata=metadata)


def from_grpc(exc: grpc.aio.AioRpcError) -> errors.CyllmError:
    """Translate a failed call back into the error the peer raised."""
    return _received(exc.code(), exc.details() or exc.code().name.lower(), exc.trailing_metadata() or ())


def as_received(err: errors.CyllmError) -> errors.CyllmError:
    """``err`` as a caller across the plane gets it, ``from_grpc`` of ``to_grpc`` — for a
    call made in-process (``local.py``), which must fail exactly as a remote one."""
    code, details, metadata = to_grpc(err)
    return _received(code, details or code.name.lower(), metadata)


_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def end_of(err: errors.CyllmError) -> tuple[int, str, dict[str, str]]:
    """(status number, details, trailing metadata) for a call of a session
    (``session.py``) that fails with ``err``: its ``CallEnd``."""
    code, details, metadata = to_grpc(err)
    return code.value[0], details, dict(metadata)


def from_end(code: int, details: str, trailing: dict[str, str]) -> errors.CyllmError:
    """A session call's failure (its ``CallEnd``), as ``from_grpc`` reads a status."""
    status = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return _received(status, details or status.name.lower(), trailing.items())


def _received(code: grpc.StatusCode, message: str, trailing) -> errors.CyllmError:
    metadata = {k: v for k, v in trailing}
    cls = _BY_CODE.get(str(metadata.get(ERROR_KEY, "")))
    if cls is None:
        cls = _FROM_BARE_STATUS.get(code, errors.EngineError)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            message = f"the request is too large to pass between components ({message})"
    if cls is errors.Overloaded:
        return errors.Overloaded(message, retry_after=float(metadata.get(RETRY_AFTER_KEY, 1)))
    param = metadata.get("cyllm-param")
    return cls(message, param=unquote(param) if param else None)
