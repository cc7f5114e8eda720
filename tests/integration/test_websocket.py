"""The WebSocket endpoint: same auth, limits and error shape as HTTP.  The gateway runs
under uvicorn on a real socket; the client is the ``websockets`` library."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import uvicorn
import websockets

from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol import pb
from tests.conftest import free_port
from tests.polling import returns, until


@pytest.fixture
async def gateway(make_stack, tmp_path):
    stack = await make_stack()
    app = create_app(
        GatewaySettings(
            coordinators=[f"127.0.0.1:{stack.coordinator.port}"],
            auth_enabled=True,
            api_keys_file=tmp_path / "keys.json",
            rate_limit_rpm=2,
        )
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    await until(lambda: returns(server.started), timeout=10, what="uvicorn to start")
    yield app, f"ws://127.0.0.1:{port}/api/v1/inference/ws"
    server.should_exit = True
    await task


async def recv(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def test_websocket_needs_credentials(gateway):
    _, url = gateway
    async with websockets.connect(url) as ws:
        msg = await recv(ws)
        assert msg["type"] == "error" and msg["error"]["type"] == "authentication_error"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008


async def test_websocket_streams_tokens_then_done_and_reports_errors(gateway):
    app, url = gateway
    meta, key = await app.state.keys.create("ws")
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        await ws.send(json.dumps({"modelId": "fake", "prompt": "hello", "maxTokens": 3}))
        got = [await recv(ws)]
        while got[-1]["type"] == "token":
            got.append(await recv(ws))
        # Tokens may come merged (a lagging reader gets fewer, larger frames): same text.
        assert [m["type"] for m in got[:-1]] == ["token"] * (len(got) - 1) and got[-1]["type"] == "done"
        assert "".join(m["text"] for m in got[:-1]) == "w0 w1 w2"
        assert got[-1]["usage"]["completionTokens"] == 3
        await ws.send("{not json")
        bad = await recv(ws)
        assert bad["type"] == "error" and bad["error"]["code"] == "invalid_request"
        await ws.send(json.dumps({"modelId": "nope", "prompt": "x"}))
        assert (await recv(ws))["error"]["code"] == "model_not_found"
    # browsers: the key as a subprotocol, answered with cyllm.v1 (never in the URL)
    async with websockets.connect(url, subprotocols=["cyllm.v1", f"bearer.{key}"]) as ws:
        assert ws.subprotocol == "cyllm.v1"
        await ws.send(json.dumps({"modelId": "fake", "prompt": "x", "maxTokens": 1}))  # 3rd: over rpm=2
        limited = await recv(ws)
        assert limited["error"]["code"] == "rate_limit_exceeded"
    # Each message in the usage ledger: the answer, and the unknown model as an error with no name.
    await app.state.usage.flush()
    now = int(time.time())
    report = await app.state.client.query_usage(
        pb.UsageQuery(
            start=now - 3600,
            end=now + 3600,
            group_by=["route", "model", "outcome"],
            subject=f"key:{meta.key_id}",
        )
    )
    got = {(r.route, r.model, r.outcome): (r.requests, r.completion_tokens) for r in report.rows}
    assert got == {
        ("/api/v1/inference/ws", "fake", "ok"): (1, 3),
        ("/api/v1/inference/ws", "", "error"): (1, 0),
    }


async def test_a_revoked_key_closes_an_open_socket_and_bad_frames_get_errors(gateway):
    app, url = gateway
    meta, key = await app.state.keys.create("ws")
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        await ws.send(b"\x00\x01binary")
        assert "text frame" in (await recv(ws))["error"]["message"]
        await ws.send("[" * 100_000 + "]" * 100_000)
        nested = await recv(ws)
        assert nested["type"] == "error" and nested["error"]["code"] == "invalid_request"
        await app.state.keys.revoke(meta.key_id)
        await ws.send(json.dumps({"modelId": "fake", "prompt": "x", "maxTokens": 1}))
        assert (await recv(ws))["error"]["type"] == "authentication_error"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd.code == 1008
