"""The whole request path (gateway -> coordinator -> worker) with the fake engine."""

from __future__ import annotations

import asyncio
import json

import httpx

from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings
from tests.integration.conftest import BOTH_WAYS, fake_model
from tests.polling import returns, until

pytestmark = BOTH_WAYS

USER = [{"role": "user", "content": "hello there"}]


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_chat_completion_has_openai_shape_and_usage(make_stack):
    stack = await make_stack()
    resp = await stack.http.post(
        "/v1/chat/completions", json={"model": "fake", "messages": USER, "max_tokens": 4}
    )
    body = resp.json()
    assert resp.headers["x-request-id"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2 w3"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


async def test_chat_stream_ends_with_finish_reason_usage_and_done(make_stack):
    stack = await make_stack()
    resp = await stack.http.post(
        "/v1/chat/completions",
        json={
            "model": "fake",
            "messages": USER,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.headers["content-type"].startswith("text/event-stream")
    data = sse_data(resp.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "w0 w1 w2"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_stop_sequence_ends_the_text_before_it(make_stack):
    stack = await make_stack()
    resp = await stack.http.post(
        "/v1/completions", json={"model": "fake", "prompt": "a b", "max_tokens": 10, "stop": [" w3"]}
    )
    choice = resp.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("w0 w1 w2", "stop")


async def test_native_stream_sends_token_events_then_done(make_stack):
    stack = await make_stack()
    resp = await stack.http.post(
        "/api/v1/inference/stream", json={"modelId": "fake", "prompt": "hi", "maxTokens": 2}
    )
    events = [line[len("event: ") :] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert events[-1] == "done" and set(events[:-1]) == {"token"}  # tokens may come merged
    data = [json.loads(d) for d in sse_data(resp.text)]
    assert "".join(d["text"] for d in data[:-1]) == "w0 w1"
    done = data[-1]
    assert done["finishReason"] == "length" and done["usage"]["completionTokens"] == 2


async def test_models_are_listed_on_both_surfaces(make_stack):
    stack = await make_stack([fake_model("a"), fake_model("b", max_context=128)])
    openai_ids = [m["id"] for m in (await stack.http.get("/v1/models")).json()["data"]]
    native = (await stack.http.get("/api/v1/models")).json()["models"]
    assert openai_ids == ["a", "b"]
    assert [(m["id"], m["contextLength"]) for m in native] == [("a", 4096), ("b", 128)]
    assert (await stack.http.get("/v1/models/b")).json()["id"] == "b"


async def test_deterministic_requests_are_answered_from_the_cache(make_stack):
    stack = await make_stack()
    body = {"modelId": "fake", "prompt": "same", "maxTokens": 3, "temperature": 0}
    first = (await stack.http.post("/api/v1/inference", json=body)).json()
    second = (await stack.http.post("/api/v1/inference", json=body)).json()
    sampled = (await stack.http.post("/api/v1/inference", json={**body, "temperature": 0.5})).json()
    assert (first["cached"], second["cached"], sampled["cached"]) == (False, True, False)
    assert first["text"] == second["text"] and first["usage"] == second["usage"]
    health = (await stack.http.get("/api/v1/health")).json()
    assert health["coordinators"][0]["cacheHits"] == 1


async def test_full_queue_refuses_with_429_and_retry_after(make_stack):
    slow = fake_model(max_batch_size=1, engine_args={"token_delay_s": 0.05})
    stack = await make_stack([slow], queue_max_size=1, retry_after_s=2)
    body = {"model": "fake", "messages": USER, "max_tokens": 20}
    running = asyncio.create_task(stack.http.post("/v1/chat/completions", json=body))
    await _running(stack, 1)  # takes the only worker slot
    queued = asyncio.create_task(stack.http.post("/v1/chat/completions", json=body))
    await _queued(stack, 1)  # waits in the queue (size 1)
    refused = await stack.http.post("/v1/chat/completions", json=body)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "2"
    assert "queue is full" in refused.json()["error"]["message"]
    # Nothing accepted was lost.
    assert (await running).status_code == 200
    assert (await queued).status_code == 200


async def test_higher_priority_is_served_first(make_stack):
    slow = fake_model(max_batch_size=1, engine_args={"token_delay_s": 0.02})
    stack = await make_stack([slow])
    finished: list[str] = []

    async def ask(name: str, priority: int, tokens: int = 5) -> None:
        r = await stack.http.post(
            "/api/v1/inference",
            json={"modelId": "fake", "prompt": name, "maxTokens": tokens, "priority": priority},
        )
        assert r.status_code == 200
        finished.append(name)

    blocker = asyncio.create_task(ask("blocker", 0, tokens=100))  # 2 s: the others queue
    await _running(stack, 1)
    low = asyncio.create_task(ask("low", 0))
    await _queued(stack, 1)
    high = asyncio.create_task(ask("high", 10))  # queued after low, served before it
    await _queued(stack, 2)
    await asyncio.gather(blocker, low, high)
    assert finished == ["blocker", "high", "low"]


async def _running(stack, n: int) -> None:
    await until(
        lambda: returns(stack.worker.engines["fake"].health().running),
        lambda r: r == n,
        timeout=5,
        what=f"{n} generation(s) running",
    )


async def _queued(stack, n: int) -> None:
    await until(
        stack.coordinator.scheduler.queue_depth, lambda d: d == n, timeout=5, what=f"{n} request(s) queued"
    )


async def test_health_reports_workers_and_queue(make_stack):
    stack = await make_stack()
    resp = await stack.http.get("/api/v1/health")
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "ok"
    (worker,) = body["workers"]
    assert worker["healthy"] and worker["models"] == ["fake"] and worker["capacity"] == 32
    assert body["coordinators"][0]["queueCapacity"] == 256


async def test_gateway_skips_an_unreachable_coordinator(make_stack, unused_tcp_port):
    stack = await make_stack()
    good = f"127.0.0.1:{stack.coordinator.port}"
    dead = f"127.0.0.1:{unused_tcp_port}"
    app = create_app(GatewaySettings(coordinators=[dead, good]))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as http:
            for _ in range(8):  # each coordinator gets its turn first
                r = await http.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2})
                assert r.status_code == 200, r.text
            # After 3 unreachable answers the dead one's circuit opens: it is tried last.
            client = app.state.client
            assert client.breakers.open_peers() == {dead}
            assert [p.name for p in client._in_turn().order] == [good, dead]
            health = (await http.get("/api/v1/health")).json()
    assert health["status"] == "degraded"
    assert [c["reachable"] for c in health["coordinators"]] == [False, True]


async def test_health_is_503_when_no_worker_is_alive(make_stack):
    stack = await make_stack()
    await stack.worker.stop()
    resp = await stack.http.get("/api/v1/health")
    assert resp.status_code == 503 and resp.json()["status"] == "down"
    r = await stack.http.post("/v1/completions", json={"model": "fake", "prompt": "x"})
    assert r.status_code == 404  # the draining worker deregistered: no one serves it


async def test_a_flood_of_health_checks_shares_the_coordinators_answer(make_stack, monkeypatch):
    """The health route is public: many callers at once cost a coordinator one call at a
    time, and each still gets the cluster's state."""
    from cyllm.coordinator.services.models import ModelsService

    calls = 0
    status = ModelsService.ClusterStatus

    async def counted(self, request, context):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # an answer on its way while the others come
        return await status(self, request, context)

    monkeypatch.setattr(ModelsService, "ClusterStatus", counted)
    stack = await make_stack()
    replies = await asyncio.gather(*(stack.http.get("/api/v1/health") for _ in range(50)))
    assert all(r.status_code == 200 and r.json()["status"] == "ok" for r in replies)
    assert all(len(r.json()["workers"]) == 1 for r in replies)
    assert calls <= 3, calls
    before = calls  # and a later check asks anew: nothing is kept past its answer
    assert (await stack.http.get("/api/v1/health")).status_code == 200 and calls == before + 1
