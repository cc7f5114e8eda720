"""A fake MindIE Server: the service plane MindieEngine talks to (``GET /v1/models``,
streaming ``POST /infer_token``: token ids in, one token per SSE chunk out in the
TGI-compatible shape, ``details`` with the finish reason last), run by uvicorn on a free
port in a thread.  Its "model" is ``ToyModel`` over the given folder's tokenizer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoTokenizer

from tests.fakes import ThreadedServer, ToyModel


def app(model_name: str, folder: Path, token_delay_s: float = 0.005) -> FastAPI:
    api = FastAPI()
    api.state.cancelled = 0
    api.state.fail = False
    api.state.bodies = []
    toy = ToyModel(AutoTokenizer.from_pretrained(folder))

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    async def stream(ids: list[int], n: int):
        context = list(ids)
        try:
            for i in range(n):
                await asyncio.sleep(token_delay_s)
                if api.state.fail:
                    api.state.fail = False
                    raise RuntimeError("NPU device error")  # the connection drops mid-stream
                token = toy.next(context)
                context.append(token)
                chunk = {
                    "token": {"id": token, "text": toy.text([token]), "logprob": None, "special": False},
                    "generated_text": None,
                    "details": None,
                }
                if i + 1 == n:
                    chunk["details"] = {"finish_reason": "length", "generated_tokens": n}
                yield f"data: {json.dumps(chunk)}\n\n"
        except asyncio.CancelledError:
            api.state.cancelled += 1
            raise

    @api.post("/infer_token")
    async def infer_token(request: Request):
        body = await request.json()
        api.state.bodies.append(body)
        ids, params = body.get("input_id"), body.get("parameters") or {}
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
            return JSONResponse({"error": "input_id must be a list of token ids"}, status_code=400)
        n = params.get("max_new_tokens", 20)
        if not isinstance(n, int) or n < 1:
            return JSONResponse({"error": "max_new_tokens invalid"}, status_code=400)
        assert body.get("stream") is True
        return StreamingResponse(stream(ids, n), media_type="text/event-stream")

    return api


class Server(ThreadedServer):
    """``with Server(model, port, folder) as s: s.url``"""

    def __init__(self, model_name: str, port: int, folder: Path) -> None:
        super().__init__(app(model_name, folder), port)
