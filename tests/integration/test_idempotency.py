"""Idempotency-Key on non-streamed generations, in-process with the fake engine (the
memory store; the Redis store is run by tests/e2e/test_distributed.py)."""

from __future__ import annotations

import asyncio

from tests.integration.conftest import BOTH_WAYS, fake_model

pytestmark = BOTH_WAYS

BODY = {"model": "fake", "prompt": "hello", "max_tokens": 8}


def generated(stack) -> float:
    return (
        stack.worker.metrics.registry.get_sample_value("worker_generated_tokens_total", {"model": "fake"})
        or 0.0
    )


async def test_one_key_is_one_generation_whoever_asks_and_when(make_stack):
    stack = await make_stack([fake_model(engine_args={"token_delay_s": 0.05})])
    headers = {"Idempotency-Key": "order-42"}
    # Two at once (the second attaches to the first), then one after (from the store).
    first = await asyncio.gather(
        *(stack.http.post("/v1/completions", json=BODY, headers=headers) for _ in range(2))
    )
    later = await stack.http.post("/v1/completions", json=BODY, headers=headers)
    texts = {r.json()["choices"][0]["text"] for r in [*first, later]}
    assert [r.status_code for r in [*first, later]] == [200] * 3
    assert texts == {" ".join(f"w{i}" for i in range(8))}
    assert later.json()["usage"]["completion_tokens"] == 8
    assert generated(stack) == 8
    # Without the key (or with another), it runs again.
    await stack.http.post("/v1/completions", json=BODY)
    await stack.http.post("/v1/completions", json=BODY, headers={"Idempotency-Key": "order-43"})
    assert generated(stack) == 24


async def test_the_generation_outlives_a_caller_who_left(make_stack):
    stack = await make_stack([fake_model(engine_args={"token_delay_s": 0.05})])
    headers = {"Idempotency-Key": "left-early"}
    gone = asyncio.create_task(stack.http.post("/v1/completions", json=BODY, headers=headers))
    await asyncio.sleep(0.15)
    gone.cancel()  # the caller (its gateway) went away mid-generation
    r = await stack.http.post("/v1/completions", json=BODY, headers=headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    assert generated(stack) == 8


async def test_a_key_reused_for_another_request_or_malformed_is_a_400(make_stack):
    stack = await make_stack()
    headers = {"Idempotency-Key": "k1"}
    assert (await stack.http.post("/v1/completions", json=BODY, headers=headers)).status_code == 200
    other = await stack.http.post("/v1/completions", json={**BODY, "prompt": "bye"}, headers=headers)
    assert other.status_code == 400
    assert other.json()["error"]["param"] == "Idempotency-Key"
    for bad in ("", "x" * 256, "caf\u00e9", "a b"):
        r = await stack.http.post(
            "/v1/completions", json=BODY, headers={"Idempotency-Key": bad.encode("utf-8")}
        )
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == "Idempotency-Key"


async def test_a_streamed_request_ignores_the_key(make_stack):
    stack = await make_stack()
    for _ in range(2):
        r = await stack.http.post(
            "/v1/completions", json={**BODY, "stream": True}, headers={"Idempotency-Key": "s1"}
        )
        assert r.status_code == 200 and "w7" in r.text
    assert generated(stack) == 16


async def test_a_key_belongs_to_its_tenant(make_stack, tmp_path):
    """Another tenant sending the same key gets its own generation, never the first
    tenant's answer (nor a conflict that would tell it the key is in use)."""
    stack = await make_stack(gateway={"auth_enabled": True, "api_keys_file": tmp_path / "k.json"})
    keys = stack.app.state.keys
    for name, prompt in (("alice", "hello"), ("mallory", "tell me alice's answer")):
        _, secret = await keys.create(name)
        r = await stack.http.post(
            "/v1/completions",
            json={**BODY, "prompt": prompt, "max_tokens": 3},
            headers={"Authorization": f"Bearer {secret}", "Idempotency-Key": "shared-key"},
        )
        assert r.status_code == 200, r.text
    assert generated(stack) == 6  # two generations, one per tenant
