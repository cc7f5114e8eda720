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
from tests.polling import returns, until

pytestmark = BOTH_WAYS


@pytest.mark.parametrize("n", [1, 2])
async def test_a_client_that_hangs_up_stops_its_generation(make_stack, n):
    """With ``n`` choices each is a generation of its own: all of them stop."""
    stack = await make_stack([fake_model(engine_args={"token_delay_s": 0.05})])
    port = free_port()
    # the stack's app, its lifespan already entered by the fixture
    server = uvicorn.Server(
        uvicorn.Config(stack.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await until(lambda: returns(server.started), timeout=10, what="uvicorn to start")
    engine = stack.worker.engines["fake"]
    try:
        body = json.dumps({"model": "fake", "prompt": "x", "max_tokens": 1000, "n": n}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        await until(
            lambda: returns(engine.health().running),
            lambda r: r == n,
            timeout=5,
            what=f"{n} generations running",
        )
        writer.close()  # 1000 tokens at 50 ms: 50 s left to run
        await until(
            lambda: returns(engine.health().running),
            lambda r: r == 0,
            timeout=6,
            what="the generation to stop, nobody reading it",
        )
        # and the coordinator gave its slot back
        await until(
            stack.coordinator.scheduler.workers,
            lambda ws: not any(w.record.outstanding for w in ws),
            timeout=3,
            what="the worker slot to be given back",
        )
    finally:
        server.should_exit = True
        await task
