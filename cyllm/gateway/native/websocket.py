"""``/api/v1/inference/ws``: streaming inference over a WebSocket, with the same
credentials, limits and error shape as the HTTP routes.

Each text message from the client is one native inference request (the JSON body of
``POST /api/v1/inference``); the server answers with ``{"type": "token", "text"}``
messages and then ``{"type": "done", ...}`` or ``{"type": "error", "error": {...}}``,
and waits for the next request.  Credentials: ``Authorization: Bearer ...`` on the
handshake, or ``?api_key=...`` for browsers, which cannot set headers on a WebSocket.
A client that goes away mid-stream aborts its generation.
"""

from __future__ import annotations

import json
from contextlib import aclosing

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from cyllm import errors
from cyllm.gateway.auth import Identity
from cyllm.gateway.context import new_context
from cyllm.gateway.errors import error_body, http_status
from cyllm.gateway.generation import Done, Failed, Generation
from cyllm.gateway.native.protocol import InferenceDone, InferenceRequest

router = APIRouter(prefix="/api/v1", tags=["native"])


def _error(err: errors.CyllmError) -> dict:
    _, kind = http_status(err)
    return {"type": "error", "error": error_body(err.message, kind, err.code, err.param)["error"]}


@router.websocket("/inference/ws")
async def inference_ws(ws: WebSocket) -> None:
    await ws.accept()
    header = ws.headers.get("authorization")
    if header is None and ws.query_params.get("api_key"):
        header = f"Bearer {ws.query_params['api_key']}"
    try:
        identity = await ws.app.state.auth.identify(header)
    except errors.CyllmError as exc:
        await ws.send_json(_error(exc))
        await ws.close(code=1008, reason="unauthenticated")
        return
    try:
        while True:
            await _serve_one(ws, identity, await ws.receive_text())
    except WebSocketDisconnect:
        return


async def _serve_one(ws: WebSocket, identity: Identity, raw: str) -> None:
    try:
        body = InferenceRequest.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        message = str(exc) if not isinstance(exc, ValidationError) else "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        await ws.send_json(_error(errors.InvalidRequest(f"invalid request: {message}")))
        return
    ctx = new_context(ws.scope)  # each message is a request of its own
    ctx.identity = identity
    try:
        gen = await Generation(ws, body.generate_request(ctx.request_id)).start()
    except errors.CyllmError as exc:
        await ws.send_json(_error(exc))
        return
    async with aclosing(gen.events()) as events:  # a client gone mid-stream: closed here
        async for event in events:
            if isinstance(event, Failed):
                await ws.send_json(_error(event.error))
            elif isinstance(event, Done):
                done = InferenceDone.of(ctx.request_id, event.outcome).model_dump(by_alias=True)
                await ws.send_json({"type": "done", **done})
            else:
                await ws.send_json({"type": "token", "text": event.text})
