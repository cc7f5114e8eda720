"""One typed context per HTTP request (or WebSocket message): what the edge middleware,
the credentials check, a generation and the access log share about it.

``RequestContext`` is made by :class:`EdgeMiddleware` (or by the WebSocket route, once
per message) and read with :func:`context`; nothing else about a request is passed
through ``request.state``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cyllm.gateway import errors
from cyllm.gateway.usage import Usage

if TYPE_CHECKING:
    from cyllm.gateway.auth import Identity

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_KEY = "cyllm"
# A batch's request, sent in-process by ``batch_runner``: the scope holds the creator's
# identity under this key (no HTTP request can put anything in an ASGI scope).
BATCH_CALLER = "cyllm.batch_caller"
# The request's span (tracing.py), when tracing is on: made at the edge, the parent of
# what the request does.
TRACE = "cyllm.trace"


@dataclass
class RequestContext:
    request_id: str  # made here, always: engines know the request by it
    client_request_id: str | None = None  # the caller's X-Request-ID, for the logs only
    identity: Identity | None = None  # set by the credentials check
    usage: Usage | None = None  # set when a generation ends
    failed: bool = False  # a stream that ended in an error event (its status was 200)
    content: dict[str, Any] | None = None  # prompt and completion, only with log_content
    ratelimit_headers: dict[str, str] = field(default_factory=dict)  # echoed on the response

    @property
    def caller(self) -> Identity:
        assert self.identity is not None, "a route that reads the caller depends on authenticate"
        return self.identity


def context(conn: HTTPConnection) -> RequestContext:
    return conn.scope["state"][_KEY]


def new_context(scope: Scope, client_request_id: str | None = None) -> RequestContext:
    ctx = RequestContext(uuid.uuid4().hex, client_request_id)
    scope.setdefault("state", {})[_KEY] = ctx
    return ctx


def peek(scope: Scope) -> RequestContext | None:
    """The context if one was made (the access log runs outside the edge)."""
    return scope.get("state", {}).get(_KEY)


class EdgeMiddleware:
    """Makes each request's context: a request id made here (echoed back in X-Request-ID
    with the rate-limit headers; a caller's own well-formed X-Request-ID is kept beside
    it for the logs, never used to name the generation), the body size
    limit (enforced while the body is read), and JSON as the body type when none or
    curl's form default is declared (no route takes url-encoded forms, and ``curl -d
    '{...}'`` should just work).  File uploads (``/v1/files``, multipart) have their
    own, larger limit."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if (
            headers.get(b"content-type", b"application/x-www-form-urlencoded")
            == b"application/x-www-form-urlencoded"
        ):
            headers[b"content-type"] = b"application/json"
            scope["headers"] = list(headers.items())
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        ctx = new_context(scope, given if _REQUEST_ID.match(given) else None)
        declared = headers.get(b"content-length", b"")
        limit = self.max_upload_bytes if scope["path"] == "/v1/files" else self.max_body_bytes
        received = int(declared) if declared.isdigit() else 0  # refuse early when declared

        async def receive_checked() -> Message:
            nonlocal received
            if received > limit:
                raise errors.BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request" and not declared:
                received += len(message.get("body", b""))
                if received > limit:
                    raise errors.BodyTooLarge(limit)
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-request-id", ctx.request_id.encode())]
                extra += [(k.encode(), v.encode()) for k, v in ctx.ratelimit_headers.items()]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive_checked, send_with_id)
