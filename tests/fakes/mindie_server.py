"""A fake MindIE Server: the OpenAI/vLLM-compatible service plane MindieEngine talks to
(``GET /v1/models``, streaming ``POST /v1/chat/completions`` and ``/v1/completions``,
one generated token per SSE chunk, ``usage`` last when asked), run by uvicorn on a free
port in a thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tests.fakes import word


def app(model_name: str, token_delay_s: float = 0.005) -> FastAPI:
    api = FastAPI()
    api.state.cancelled = 0
    api.state.fail = False

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    async def stream(body: dict, chat: bool, request: Request):
        stops = body.get("stop") or []
        text = ""
        sent = 0
        n = int(body["max_tokens"])
        reason = "length"
        try:
            for i in range(n):
                await asyncio.sleep(token_delay_s)
                if api.state.fail:
                    api.state.fail = False
                    raise RuntimeError("NPU device error")  # the connection drops mid-stream
                text += word(i)
                cut = min([text.find(s) for s in stops if s in text], default=-1)
                piece = text[sent:cut] if cut >= 0 else text[sent:]
                sent += len(piece)
                done = cut >= 0 or i + 1 == n
                if cut >= 0:
                    reason = "stop"
                choice = {"index": 0, "finish_reason": reason if done else None}
                if chat:
                    choice["delta"] = {"content": piece}
                else:
                    choice["text"] = piece
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                if done:
                    break
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 1, "completion_tokens": i + 1}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            api.state.cancelled += 1
            raise

    async def handle(request: Request, chat: bool):
        body = await request.json()
        if body.get("model") != model_name:
            return JSONResponse({"error": {"message": "model not found"}}, status_code=404)
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            return JSONResponse({"error": {"message": "max_tokens invalid"}}, status_code=400)
        assert body.get("stream") is True
        assert ("messages" in body) == chat
        return StreamingResponse(stream(body, chat, request), media_type="text/event-stream")

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, True)

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, False)

    return api


class Server:
    """``with Server(model) as s: s.url``"""

    def __init__(self, model_name: str, port: int) -> None:
        self.app = app(model_name)
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port,
                                                     log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake MindIE server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(10)
