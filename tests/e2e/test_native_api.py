"""The native endpoints (``/api/v1``) over raw HTTP / SSE, and the batching and abort paths."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.e2e.conftest import MODEL
from tests.polling import wait_for


def parse_sse(lines):
    event, out = None, []
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[len("data: ") :])))
    return out


def test_stream_endpoint_streams_paris_as_sse(server):
    # Exactly the README's curl: no content-type header.
    body = json.dumps({"modelId": MODEL, "prompt": "What is the capital of France?"})
    with httpx.stream("POST", f"{server.base_url}/api/v1/inference/stream", content=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(resp.iter_lines())
    tokens = [d["text"] for e, d in events if e == "token"]
    assert len(tokens) >= 2
    assert "Paris" in "".join(tokens)
    assert events[-1][0] == "done" and events[-1][1]["finishReason"] == "stop"


def test_inference_endpoint_and_cache(server):
    body = {"modelId": MODEL, "prompt": "What is the capital of France?", "temperature": 0, "maxTokens": 16}
    first = httpx.post(f"{server.base_url}/api/v1/inference", json=body, timeout=60).json()
    again = httpx.post(f"{server.base_url}/api/v1/inference", json=body, timeout=60).json()
    assert "Paris" in first["text"]
    assert again["cached"] is True and again["text"] == first["text"]


def test_health_and_models(server):
    health = httpx.get(f"{server.base_url}/api/v1/health").json()
    assert health["status"] == "ok" and health["workers"][0]["models"] == [MODEL]
    models = httpx.get(f"{server.base_url}/api/v1/models").json()["models"]
    assert models[0]["id"] == MODEL and models[0]["contextLength"] == 8192


async def _timed_chats(base: str, n: int, concurrent: bool) -> float:
    # Distinct prompts per run: a repeated greedy prompt would come from the prompt cache.
    tag = "together" if concurrent else "in turn"
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0}
    async with httpx.AsyncClient(timeout=300) as http:

        async def one(i: int) -> None:
            r = await http.post(
                f"{base}/v1/chat/completions",
                json={
                    **body,
                    "messages": [
                        {"role": "user", "content": f"Write a long story about dragon number {i}, {tag}."}
                    ],
                },
            )
            assert r.status_code == 200
            assert r.json()["usage"]["completion_tokens"] == 24

        start = time.perf_counter()
        if concurrent:
            await asyncio.gather(*(one(i) for i in range(n)))
        else:
            for i in range(n):
                await one(i)
        return time.perf_counter() - start


def test_concurrent_requests_share_forward_passes(server):
    sequential = asyncio.run(_timed_chats(server.base_url, 8, concurrent=False))
    concurrent = asyncio.run(_timed_chats(server.base_url, 8, concurrent=True))
    # Batched decoding: 8 streams together cost far less than 8 one after another.
    assert concurrent < 0.5 * sequential, (concurrent, sequential)


def _engine_running(base_url: str) -> int:
    """Generations in flight on the worker, as its last heartbeat (every second) said."""
    return sum(w["running"] for w in httpx.get(f"{base_url}/api/v1/health").json()["workers"])


def test_disconnected_stream_frees_its_engine_slot(server):
    body = {
        "modelId": MODEL,
        "prompt": "Write a very long story about a dragon.",
        "maxTokens": 2000,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{server.base_url}/api/v1/inference/stream", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        seen = 0
        for line in lines:
            seen += line.startswith("event: token")
            if seen >= 3:
                break
        wait_for(
            lambda: _engine_running(server.base_url),
            lambda n: n == 1,
            timeout=10,
            what="the generation to run",
        )
    # The client is gone: the generation must be aborted all the way down.
    wait_for(
        lambda: _engine_running(server.base_url),
        lambda n: n == 0,
        timeout=10,
        what="the disconnected generation to leave the engine",
    )
    health = httpx.get(f"{server.base_url}/api/v1/health").json()
    assert health["workers"][0]["outstanding"] == 0


def test_response_format_in_camel_case(server):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["answer"],
    }
    r = httpx.post(
        f"{server.base_url}/api/v1/inference",
        timeout=60,
        json={
            "modelId": MODEL,
            "prompt": "What is 2 + 2? Answer as JSON.",
            "maxTokens": 30,
            "temperature": 0,
            "responseFormat": {"type": "jsonSchema", "jsonSchema": {"schema": schema}},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["finishReason"] == "stop"
    assert 0 <= json.loads(r.json()["text"])["answer"] <= 100
    bad = httpx.post(
        f"{server.base_url}/api/v1/inference",
        timeout=60,
        json={
            "modelId": MODEL,
            "prompt": "x",
            "responseFormat": {
                "type": "jsonSchema",
                "jsonSchema": {"schema": {"type": "object", "properties": {"a": {"if": {"type": "string"}}}}},
            },
        },
    )
    assert bad.status_code == 400 and "uses 'if'" in bad.json()["error"]["message"]


WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
    },
}


def test_tools_in_camel_case_whole_streamed_and_answered(server):
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    body = {
        "modelId": MODEL,
        "messages": [ask],
        "tools": [WEATHER],
        "maxTokens": 60,
        "toolChoice": {"name": "get_weather"},
        "temperature": 0,
    }
    r = httpx.post(f"{server.base_url}/api/v1/inference", json=body, timeout=60)
    assert r.status_code == 200, r.text
    whole = r.json()
    (call,) = whole["toolCalls"]
    assert whole["finishReason"] == "tool_calls" and whole["text"] is None
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"])["city"], str)
    with httpx.stream("POST", f"{server.base_url}/api/v1/inference/stream", json=body, timeout=60) as resp:
        events = parse_sse(resp.iter_lines())
    assert [e for e, _ in events] == ["done"]  # a call's text is not streamed as text
    done = events[0][1]
    assert done["finishReason"] == "tool_calls"
    assert json.loads(done["toolCalls"][0]["arguments"]) == json.loads(call["arguments"])
    # The round trip: the call and its result go back; the model answers in text.
    answer = httpx.post(
        f"{server.base_url}/api/v1/inference",
        timeout=60,
        json={
            "modelId": MODEL,
            "tools": [WEATHER],
            "toolChoice": "none",
            "maxTokens": 30,
            "temperature": 0,
            "messages": [
                ask,
                {"role": "assistant", "toolCalls": [call]},
                {"role": "tool", "toolCallId": call["id"], "content": '{"celsius": 21}'},
            ],
        },
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] and answer.json()["toolCalls"] is None
    bad = httpx.post(
        f"{server.base_url}/api/v1/inference", timeout=60, json={**body, "toolChoice": {"name": "nope"}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_logprobs_and_n_in_camel_case(server):
    body = {
        "modelId": MODEL,
        "prompt": "Name a colour.",
        "maxTokens": 6,
        "temperature": 1.0,
        "seed": 5,
        "n": 3,
        "logprobs": True,
        "topLogprobs": 2,
    }
    r = httpx.post(f"{server.base_url}/api/v1/inference", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["text"] == out["choices"][0]["text"]
    assert out["usage"]["completionTokens"] == sum(len(c["logprobs"]) for c in out["choices"])
    for entry in (e for c in out["choices"] for e in c["logprobs"]):
        assert entry["logprob"] <= 0 and len(entry["topLogprobs"]) == 2
    with httpx.stream("POST", f"{server.base_url}/api/v1/inference/stream", json=body, timeout=60) as resp:
        events = parse_sse(resp.iter_lines())
    tokens = [d for e, d in events if e == "token"]
    streamed = {i: "".join(d["text"] for d in tokens if d["index"] == i) for i in range(3)}
    assert streamed == {c["index"]: c["text"] for c in out["choices"]}  # seeded: the same
    assert all(lp["logprob"] <= 0 for d in tokens for lp in d["logprobs"])
    done = events[-1][1]
    assert [c["index"] for c in done["choices"]] == [0, 1, 2]
    refused = httpx.post(
        f"{server.base_url}/api/v1/inference",
        timeout=60,
        json={"modelId": MODEL, "prompt": "x", "topLogprobs": 2},
    )
    assert refused.status_code == 400 and "topLogprobs needs logprobs" in refused.text
