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
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from cyllm import errors
from cyllm.gateway.errors import error_body, http_status
from cyllm.gateway.generation import Generation
from cyllm.gateway.native.protocol import InferenceRequest
from cyllm.gateway.native.router import _request, _usage

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
        ws.state.identity = await ws.app.state.auth.identify(header)
    except errors.CyllmError as exc:
        await ws.send_json(_error(exc))
        await ws.close(code=1008, reason="unauthenticated")
        return
    try:
        while True:
            await _serve_one(ws, await ws.receive_text())
    except WebSocketDisconnect:
        return


async def _serve_one(ws: WebSocket, raw: str) -> None:
    try:
        body = InferenceRequest.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        message = str(exc) if not isinstance(exc, ValidationError) else "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        await ws.send_json(_error(errors.InvalidRequest(f"invalid request: {message}")))
        return
    rid = ws.state.request_id = uuid.uuid4().hex
    try:
        gen = await Generation(ws, _request(body, rid)).start()
        async for text in gen.deltas():
            await ws.send_json({"type": "token", "text": text})
    except errors.CyllmError as exc:
        await ws.send_json(_error(exc))
        return
    await ws.send_json({"type": "done", "id": rid, "finishReason": gen.outcome.finish_reason,
                        "cached": gen.outcome.cached, "usage": _usage(gen).model_dump(by_alias=True)})
