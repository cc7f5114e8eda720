"""A non-streamed request whose client hangs up is cancelled down to the engine (issue
12): nobody will read the answer, and its slot and tokens are another caller's.  The
gateway runs under uvicorn on a real socket; the client is a raw socket that leaves."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn

from tests.conftest import free_port
from tests.integration.conftest import BOTH_WAYS, fake_model

pytestmark = BOTH_WAYS


@pytest.mark.parametrize("n", [1, 2])
async def test_a_client_that_hangs_up_stops_its_generation(make_stack, n):
    """With ``n`` choices each is a generation of its own: all of them stop."""
    stack = await make_stack([fake_model(engine_args={"token_delay_s": 0.05})])
    port = free_port()
    # the stack's app, its lifespan already entered by the fixture
    server = uvicorn.Server(uvicorn.Config(stack.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    engine = stack.worker.engines["fake"]
    try:
        body = json.dumps({"model": "fake", "prompt": "x", "max_tokens": 1000, "n": n}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        for _ in range(100):
            if engine.health().running == n:
                break
            await asyncio.sleep(0.05)
        assert engine.health().running == n
        writer.close()  # 1000 tokens at 50 ms: 50 s left to run
        for _ in range(60):
            if engine.health().running == 0:
                break
            await asyncio.sleep(0.1)
        assert engine.health().running == 0, "the generation kept running for nobody"
        for _ in range(50):  # and the coordinator gave its slot back
            if not any(w.record.outstanding for w in await stack.coordinator.scheduler.workers()):
                break
            await asyncio.sleep(0.05)
        assert not any(w.record.outstanding for w in await stack.coordinator.scheduler.workers())
    finally:
        server.should_exit = True
        await task
