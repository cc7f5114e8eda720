"""A non-streamed request whose client hangs up is cancelled down to the engine (issue
12): nobody will read the answer, and its slot and tokens are another caller's.  The
gateway runs under uvicorn on a real socket; the client is a raw socket that leaves."""

from __future__ import annotations

import asyncio
import json

import uvicorn

from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings
from tests.conftest import free_port
from tests.integration.conftest import fake_model


async def test_a_client_that_hangs_up_stops_its_generation(make_stack):
    stack = await make_stack([fake_model(engine_args={"token_delay_s": 0.05})])
    app = create_app(GatewaySettings(coordinators=[f"127.0.0.1:{stack.coordinator.port}"]))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    engine = stack.worker.engines["fake"]
    try:
        body = json.dumps({"model": "fake", "prompt": "x", "max_tokens": 1000}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        for _ in range(100):
            if engine.health().running:
                break
            await asyncio.sleep(0.05)
        assert engine.health().running == 1
        writer.close()  # 1000 tokens at 50 ms: 50 s left to run
        for _ in range(60):
            if engine.health().running == 0:
                break
            await asyncio.sleep(0.1)
        assert engine.health().running == 0, "the generation kept running for nobody"
    finally:
        server.should_exit = True
        await task
