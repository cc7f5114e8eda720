"""Failures between coordinator and workers, in-process with the fake engine."""

from __future__ import annotations

import asyncio
import json

from cyllm.protocol import pb
from cyllm.worker.main import WorkerServer
from cyllm.worker.settings import WorkerSettings
from tests.conftest import free_port
from tests.integration.conftest import BOTH_WAYS, fake_model
from tests.polling import until

pytestmark = BOTH_WAYS


async def test_a_dead_worker_is_skipped_and_its_circuit_opens(make_stack):
    stack = await make_stack(breaker_failures=2, breaker_cooldown_s=30)
    dead = pb.WorkerInfo(
        worker_id="dead",
        address=f"127.0.0.1:{free_port()}",
        capacity=4,
        models=[pb.ModelInfo(id="fake", context_length=4096)],
    )
    await stack.coordinator.scheduler.register(dead)
    # Every request succeeds: a failure before the first token moves on to another worker.
    for i in range(4):
        r = await stack.http.post(
            "/v1/completions", json={"model": "fake", "prompt": f"p{i}", "max_tokens": 3}
        )
        assert r.status_code == 200, r.text
    workers = {w["id"]: w for w in (await stack.http.get("/api/v1/health")).json()["workers"]}
    assert workers["dead"]["healthy"] is False
    assert workers["dead"]["unhealthyReason"] == "circuit open"
    assert workers["dead"]["outstanding"] == 0  # failed attempts gave their slots back


async def test_a_stream_whose_only_worker_stalls_ends_with_an_error_event(make_stack):
    stuck = fake_model(engine_args={"token_delay_s": 0.01, "hang_after": 2})
    stack = await make_stack([stuck], progress_timeout_s=1.0)
    r = await stack.http.post(
        "/v1/chat/completions",
        json={
            "model": "fake",
            "stream": True,
            "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert r.status_code == 200  # the stream had started: the error comes as an event
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    contents = [json.loads(d)["choices"][0]["delta"].get("content") for d in data[:-1]]
    assert "w0" in contents  # tokens before the stall reached the client
    error = json.loads(data[-1])["error"]
    # It was tried again there (the only worker), then found unhealthy: a clear 503.
    assert error["code"] == "unavailable", error
    assert "produced nothing for 1s" in error["message"] or "no token for" in error["message"]


async def test_streams_on_a_hung_worker_resume_on_another_exactly(make_stack):
    stuck = fake_model(engine_args={"token_delay_s": 0.01, "hang_after": 3})
    stack = await make_stack([stuck], progress_timeout_s=1.0)
    good = WorkerServer(
        WorkerSettings(
            port=0,
            worker_id="good",
            coordinators=stack.worker.settings.coordinators,
            metrics_port=None,
            models=[fake_model(engine_args={"token_delay_s": 0.01})],
        )
    )
    await good.start()
    try:
        await until(
            stack.coordinator.scheduler.workers,
            lambda ws: len(ws) == 2,
            timeout=5,
            what="both workers to register",
        )

        async def stream(i: int) -> tuple[str, dict]:
            r = await stack.http.post(
                "/v1/completions",
                json={
                    "model": "fake",
                    "prompt": f"p{i}",
                    "max_tokens": 12,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
            assert r.status_code == 200
            chunks = [
                json.loads(line[6:])
                for line in r.text.splitlines()
                if line.startswith("data: ") and line != "data: [DONE]"
            ]
            assert not any("error" in c for c in chunks), chunks
            return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks[-1]["usage"]

        # Two at once: one lands on each worker; the hung one's moves to the good one.
        results = await asyncio.gather(stream(0), stream(1))
        expected = " ".join(f"w{i}" for i in range(12))
        assert [text for text, _ in results] == [expected, expected]
        assert all(usage["completion_tokens"] == 12 for _, usage in results)
        resumed = stack.coordinator.metrics.registry.get_sample_value(
            "coordinator_worker_retries_total", {"kind": "resumed"}
        )
        assert resumed and resumed >= 1
    finally:
        await good.stop()
