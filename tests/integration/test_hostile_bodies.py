"""Bodies built to make the gateway work hard: a validation error is bounded (the first
problems and a count, not one line per bad element), and the WebSocket takes no message
larger than an HTTP body."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import uvicorn
import websockets

from tests.conftest import free_port
from tests.integration.conftest import fake_model
from tests.polling import returns, until

BOUND = 8 * 1024  # the largest error answer this suite accepts


async def test_a_body_of_many_bad_elements_gets_a_short_error_at_once(make_stack):
    stack = await make_stack(gateway={"max_body_bytes": 2 << 20})
    body = json.dumps({"model": "fake", "messages": [{}] * 200_000})  # 600 KB
    started = time.perf_counter()
    r = await stack.http.post("/v1/chat/completions", content=body)
    elapsed = time.perf_counter() - started
    assert r.status_code == 400, r.text[:500]
    assert len(r.content) < BOUND, len(r.content)
    assert "at most 4096 items" in r.json()["error"]["message"]  # the list refused whole
    assert elapsed < 5, elapsed  # generous for a 2-core CI machine; the old code took 3.4 s more
    # under the cap, every element bad: the first few problems and a count
    r = await stack.http.post(
        "/v1/chat/completions",
        content=json.dumps({"model": "fake", "messages": [{"content": [{}] * 4000}] * 4}),
    )
    assert r.status_code == 400 and len(r.content) < BOUND, len(r.content)
    message = r.json()["error"]["message"]
    assert "messages.0.role" in message and "more problems" in message, message


@pytest.fixture
async def ws_url(make_stack):
    stack = await make_stack(gateway={"max_body_bytes": 64 * 1024})
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(stack.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await until(lambda: returns(server.started), timeout=10, what="uvicorn to start")
    yield f"ws://127.0.0.1:{port}/api/v1/inference/ws"
    server.should_exit = True
    await task


async def test_the_websocket_refuses_a_message_larger_than_a_body(ws_url):
    async with websockets.connect(ws_url, max_size=None) as ws:
        huge = json.dumps({"modelId": "fake", "prompt": "x" * (256 * 1024), "maxTokens": 2})
        await ws.send(huge)
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "error" and "65536" in reply["error"]["message"], reply
        # the socket is still usable for a request of the right size
        await ws.send(json.dumps({"modelId": "fake", "prompt": "hi", "maxTokens": 2}))
        frames = [json.loads(await asyncio.wait_for(ws.recv(), 10))]
        while frames[-1]["type"] == "token":
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        assert frames[-1]["type"] == "done", frames


async def test_the_websockets_validation_errors_are_bounded_too(ws_url):
    async with websockets.connect(ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"modelId": "fake", "messages": [{}] * 10_000}))
        raw = await asyncio.wait_for(ws.recv(), 10)
        assert len(raw) < BOUND, len(raw)
        reply = json.loads(raw)
        assert reply["type"] == "error" and "at most 4096 items" in reply["error"]["message"]
        await ws.send(json.dumps({"modelId": "fake", "messages": [{"role": "user", "content": 1}] * 1500}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert "more problems" in reply["error"]["message"] and len(json.dumps(reply)) < BOUND


async def test_a_tool_schemas_pattern_cannot_stall_other_callers(make_stack):
    """``tool_choice: auto``: the answer is read for calls and their arguments checked
    against the caller's schema.  A catastrophic pattern and an answer built for it
    used to hold the gateway's event loop for minutes; now the answer comes back as
    text within the time budget and other callers are answered meanwhile."""
    call = '<tool_call>{"name": "f", "arguments": {"x": "' + "a" * 30 + '!"}}</tool_call>'
    stack = await make_stack(
        [fake_model("evil", engine_args={"reply": call}), fake_model()], gateway={"max_body_bytes": 1 << 20}
    )
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^(a|a)*$"}}},
        },
    }
    body = {
        "model": "evil",
        "tools": [tool],
        "tool_choice": "auto",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "call f"}],
    }
    started = time.perf_counter()
    hostile = asyncio.create_task(stack.http.post("/v1/chat/completions", json=body))
    others = [
        await stack.http.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2})
        for _ in range(5)
    ]
    r = await hostile
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == call  # not a call
    assert all(o.status_code == 200 for o in others)
    assert time.perf_counter() - started < 10
