"""The one place where errors become HTTP responses, in OpenAI's error shape:

{"error": {"message": "...", "type": "...", "param": "...", "code": "..."}}
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cyllm import errors
from cyllm.shared_state import unreachable

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[errors.CyllmError], int, str]] = [
    (errors.Unauthenticated, 401, "authentication_error"),
    (errors.Forbidden, 403, "permission_error"),
    (errors.InvalidRequest, 400, "invalid_request_error"),
    (errors.NotFound, 404, "invalid_request_error"),
    (errors.NotLoadable, 409, "invalid_request_error"),
    (errors.Overloaded, 429, "rate_limit_error"),
    (errors.Unavailable, 503, "service_unavailable"),
    (errors.RequestCancelled, 499, "cancelled"),
    (errors.EngineError, 500, "server_error"),
]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, used for every error this gateway returns."""

    error: ErrorDetail


# The type of a route's OpenAPI ``responses`` (FastAPI's own parameter type).
Responses = dict[int | str, dict[str, Any]]


def responses(*codes: int) -> Responses:
    """OpenAPI ``responses`` entries for these error statuses, all in ``ErrorResponse``."""
    text = {
        400: "Invalid request",
        401: "Missing or invalid credentials",
        403: "Not allowed (model, scope)",
        404: "Unknown model or route",
        409: "The model cannot be loaded here (engine library, hardware or memory)",
        413: "Body too large",
        429: "Queue full or rate limit; see Retry-After and x-ratelimit-*",
        500: "Internal error",
        503: "No healthy worker or coordinator",
    }
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


# What any authenticated generation route may answer besides 200.
GENERATION_ERRORS = responses(400, 401, 403, 404, 413, 429, 500, 503)


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read; an HTTPException so FastAPI passes it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def http_status(err: errors.CyllmError) -> tuple[int, str]:
    for cls, code, kind in _STATUS:
        if isinstance(err, cls):
            return code, kind
    return 500, "server_error"


# Internal addresses in a message (a worker's gRPC peer, a coordinator's, a worker id
# made of its address): what a caller is told names none of them; the log keeps them.
_INTERNAL = re.compile(
    r"\bipv[46]:\S+?(?=[\s,;)]|$)"
    r"|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?:[:-]\d{1,5})?\b"
    r"|\b(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+):\d{1,5}\b"
)


def public(message: str) -> str:
    """``message`` as a caller may read it: internal addresses replaced."""
    return _INTERNAL.sub("(internal address)", message)


def error_body(message: str, kind: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_of(err: errors.CyllmError) -> dict:
    """``err`` in OpenAI's error shape.  A server-side failure (5xx) is told without
    the internal addresses its message may carry (a worker's, a coordinator's); a
    refusal of what the caller sent is told as it is."""
    status, kind = http_status(err)
    message = public(err.message) if status >= 500 else err.message
    return error_body(message, kind, err.code, err.param)


def error_response(err: errors.CyllmError) -> JSONResponse:
    code, _ = http_status(err)
    headers = {}
    if isinstance(err, errors.Overloaded):
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if isinstance(err, errors.RateLimited):
        headers.update(err.headers)
    if isinstance(err, errors.Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_of(err), code, headers=headers)


def stream_error(err: errors.CyllmError) -> str:
    """The error as one SSE data payload, for failures after the stream has started."""
    return json.dumps(error_of(err))


SHOWN_PROBLEMS = 5  # a body with 200,000 bad elements is told the first few and a count


def describe(problems: Sequence[Any]) -> tuple[str, str | None]:
    """A validation's problems (pydantic's ``errors()``) as one message and the first
    parameter at fault: the first few, each bounded, and how many more there are."""
    shown, param = [], None
    for e in problems[:SHOWN_PROBLEMS]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        where = ".".join(loc)[:200] or "body"
        param = param or where
        shown.append(f"{where}: {e['msg'].removeprefix('Value error, ')[:300]}")
    more = len(problems) - len(shown)
    message = "; ".join(shown) + (f"; and {more} more problems" if more > 0 else "")
    return message or "invalid request", param


def install(app: FastAPI) -> None:
    @app.exception_handler(errors.CyllmError)
    async def _cyllm(request: Request, exc: errors.CyllmError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe(exc.errors())
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(
            exc.status_code, "http_error"
        )
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(
            error_body(message, "invalid_request_error", code),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if (err := unreachable(exc)) is not None:  # the shared Redis, for a moment
            log.warning("%s %s: %s", request.method, request.url.path, err.message)
            return error_response(err)
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), 500)
