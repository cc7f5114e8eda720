"""The project's own error hierarchy.

Every component raises these; library exceptions are translated into them at the
adapter edge (engines, gRPC clients).  Each boundary maps the hierarchy exactly once:
``cyllm.protocol.status`` to and from gRPC status codes, ``cyllm.gateway.errors`` to
HTTP status codes and OpenAI's error body.

    CyllmError
     +-- Unauthenticated       no or bad credentials (HTTP 401)
     +-- Forbidden             valid caller, not allowed this (HTTP 403)
     +-- InvalidRequest        the caller sent something unusable (HTTP 400)
     |    +-- ContextLengthExceeded   prompt + max_tokens do not fit the model (400)
     +-- NotFound              no such training job, file, ... (404)
     |    +-- ModelNotFound    no worker serves that model id (404)
     +-- NotLoadable           a model cannot be loaded here: its engine's library or
     |    |                    hardware is missing (409)
     |    +-- InsufficientMemory   it does not fit; says how much is needed and free (409)
     +-- Overloaded            queue full; carries ``retry_after`` seconds (429)
     |    +-- RateLimited       over the caller's limit; carries the rate-limit headers (429)
     +-- Unavailable           no live worker / coordinator to take the work (503)
     |    +-- Unreachable       a peer could not be reached at all (a transport failure
     |                         seen by a gRPC client, never an answer; worth another peer)
     +-- RequestCancelled      the caller went away; not an error to report (499)
     +-- EngineError           the engine failed while generating (500)
"""

from __future__ import annotations


class CyllmError(Exception):
    """Base class.  ``code`` is a stable machine-readable string (OpenAI's ``code``)."""

    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Unauthenticated(CyllmError):
    code = "invalid_api_key"


class Forbidden(CyllmError):
    code = "forbidden"


class InvalidRequest(CyllmError):
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class NotFound(CyllmError):
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class NotLoadable(CyllmError):
    code = "model_not_loadable"


class InsufficientMemory(NotLoadable):
    code = "insufficient_memory"


class Overloaded(CyllmError):
    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Overloaded):
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(message, retry_after=retry_after)
        self.headers = headers


class Unavailable(CyllmError):
    code = "unavailable"


class Unreachable(Unavailable):
    """Made only by ``protocol.status.from_grpc`` from a status gRPC itself produced."""


class RequestCancelled(CyllmError):
    code = "cancelled"


class EngineError(CyllmError):
    code = "engine_error"
