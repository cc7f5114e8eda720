"""``/api/v1/inference/ws``: streaming inference over a WebSocket, with the same
credentials, limits and error shape as the HTTP routes.

Each text message from the client is one native inference request (the JSON body of
``POST /api/v1/inference``); the server answers with ``{"type": "token", "text"}``
messages and then ``{"type": "done", ...}`` or ``{"type": "error", "error": {...}}``,
and waits for the next request.  Credentials: ``Authorization: Bearer ...`` on the
handshake, or — for browsers, which cannot set headers on a WebSocket — the
subprotocols ``["cyllm.v1", "bearer.<API key or JWT>"]`` (the server answers
``cyllm.v1``).  Never a query parameter: URLs end up in access logs.  The credentials
are checked again before each request, so a revoked key stops working on an open
socket too (error frame, then close 1008).  A client that goes away mid-stream aborts
its generation; a binary or malformed frame gets an error frame and the socket stays.
"""

from __future__ import annotations

import json
from contextlib import aclosing

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from cyllm import errors
from cyllm.gateway.auth import Identity
from cyllm.gateway.context import new_context
from cyllm.gateway.errors import describe, error_of
from cyllm.gateway.generation import Failed
from cyllm.gateway.metrics import record_usage
from cyllm.gateway.native.inference import Inference
from cyllm.gateway.native.schemas import InferenceRequest

router = APIRouter(prefix="/api/v1", tags=["native"])


def _error(err: errors.CyllmError) -> dict:
    return {"type": "error", "error": error_of(err)["error"]}


SUBPROTOCOL = "cyllm.v1"
_BEARER = "bearer."


def _credentials(ws: WebSocket) -> tuple[str | None, str | None]:
    """(the Authorization value, the subprotocol to answer with)."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    answer = SUBPROTOCOL if SUBPROTOCOL in offered else None
    header = ws.headers.get("authorization")
    if header is None:
        token = next((p[len(_BEARER) :] for p in offered if p.startswith(_BEARER)), None)
        header = f"Bearer {token}" if token else None
    return header, answer


@router.websocket("/inference/ws")
async def inference_ws(ws: WebSocket) -> None:
    header, subprotocol = _credentials(ws)
    await ws.accept(subprotocol=subprotocol)
    auth = ws.app.state.auth
    try:
        if await _identify(ws, auth, header) is None:
            return
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            # again for every request: a key revoked meanwhile ends the socket
            if (identity := await _identify(ws, auth, header)) is None:
                return
            if message.get("text") is None:
                await ws.send_json(
                    _error(
                        errors.InvalidRequest(
                            "send each request as a text frame holding JSON, not a binary frame"
                        )
                    )
                )
                continue
            limit = ws.app.state.settings.max_body_bytes
            if len(message["text"]) > limit or len(message["text"].encode(errors="surrogatepass")) > limit:
                await ws.send_json(
                    _error(
                        errors.InvalidRequest(f"a request is at most {limit} bytes (gateway.max_body_bytes)")
                    )
                )
                continue
            await _serve_one(ws, identity, message["text"])
    except WebSocketDisconnect:
        return


async def _identify(ws: WebSocket, auth, header: str | None) -> Identity | None:
    """The caller, or None after an error frame and a close (1008)."""
    try:
        return await auth.identify(header)
    except errors.CyllmError as exc:
        await ws.send_json(_error(exc))
        await ws.close(code=1008, reason="unauthenticated")
        return None


async def _serve_one(ws: WebSocket, identity: Identity, raw: str) -> None:
    try:
        body = InferenceRequest.model_validate(json.loads(raw))
    except RecursionError:
        await ws.send_json(_error(errors.InvalidRequest("invalid request: JSON nested too deeply")))
        return
    except ValidationError as exc:
        message, param = describe(exc.errors(include_url=False, include_context=False, include_input=False))
        await ws.send_json(_error(errors.InvalidRequest(f"invalid request: {message}", param=param)))
        return
    except ValueError as exc:  # not JSON
        await ws.send_json(_error(errors.InvalidRequest(f"invalid request: {str(exc)[:300]}")))
        return
    ctx = new_context(ws.scope)  # each message is a request of its own
    ctx.identity = identity
    try:
        try:
            run = await Inference(body, ctx.request_id).start(ws, whole=False)
        except errors.CyllmError as exc:
            ctx.failed = True
            await ws.send_json(_error(exc))
            return
        async with aclosing(run.events()) as events:  # a client gone mid-stream: closed here
            async for event in events:
                if isinstance(event, Failed):
                    await ws.send_json(_error(event.error))
                else:
                    await ws.send_json({"type": event[0], **event[1]})
    finally:
        if ctx.usage is not None:
            status = 500 if ctx.failed else 200
            record_usage(ws.app, identity.subject, "/api/v1/inference/ws", status, ctx.usage)
