"""Model load/unload through the API, the memory manager's accounting and LRU eviction,
and LoRA adapters registered at run time — through gateway → coordinator → worker."""

from __future__ import annotations

import asyncio

from cyllm.worker.settings import ModelSpec
from tests.engines.conftest import default_folder
from tests.integration.conftest import fake_model
from tests.polling import returns, until


def small(model_id: str, **kw) -> ModelSpec:
    """The real default model, small KV cache: ~0.52 GiB by the memory manager."""
    return ModelSpec(
        id=model_id, path=default_folder(), max_context=256, max_batch_size=2, temperature=0.0, **kw
    )


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **kw}


async def listing(stack) -> dict[str, dict]:
    body = (await stack.http.get("/api/v1/models")).json()
    return {m["id"]: m for m in body["models"]}


async def openai_ids(stack) -> list[str]:
    return [m["id"] for m in (await stack.http.get("/v1/models")).json()["data"]]


async def test_load_evicts_the_least_recently_used_idle_model(make_stack):
    stack = await make_stack(
        [small("a"), small("b", preload=False), small("c", preload=False)], worker={"memory_limit_gib": 1.2}
    )
    models = await listing(stack)
    assert models["a"]["state"] == "loaded" and models["b"]["state"] == "available"
    assert 0.5 * 2**30 < models["a"]["memoryBytes"] < 0.6 * 2**30
    assert await openai_ids(stack) == ["a", "b", "c"]  # the loaded, and what loads on demand

    loaded = await stack.http.post("/api/v1/models/b/load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["evicted"] == [] and {m["id"] for m in loaded.json()["models"]} == {"a", "b"}
    assert (await stack.http.post("/v1/chat/completions", json=chat("a"))).status_code == 200

    # a was used after b was loaded: b is the least recently used and goes.
    loaded = await stack.http.post("/api/v1/models/c/load")
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["evicted"] == ["b"]
    assert (await listing(stack))["b"]["state"] == "available"
    # asked for, b is loaded again on demand: a (used before c came) makes room
    again = await stack.http.post("/v1/chat/completions", json=chat("b"))
    assert again.status_code == 200, again.text
    states = {m: e["state"] for m, e in (await listing(stack)).items()}
    assert states == {"a": "available", "b": "loaded", "c": "loaded"}

    unloaded = await stack.http.post("/api/v1/models/c/unload")
    assert unloaded.status_code == 200 and unloaded.json()["workerIds"] == [stack.worker.worker_id]
    assert (await listing(stack))["c"]["state"] == "available"
    metrics = stack.worker.metrics.registry.get_sample_value
    assert metrics("worker_model_memory_estimate_bytes", {"model": "b"}) > 0.5 * 2**30
    assert metrics("worker_memory_budget_bytes") == int(1.2 * 2**30)


async def test_busy_models_are_not_evicted_and_the_refusal_gives_the_numbers(make_stack):
    stack = await make_stack([small("a"), small("b", preload=False)], worker={"memory_limit_gib": 0.8})

    async def long_chat():
        return await stack.http.post("/v1/chat/completions", json=chat("a", max_tokens=200))

    busy = asyncio.create_task(long_chat())
    await until(
        lambda: returns(stack.worker.models.engines()["a"].health().running),
        timeout=10,
        what="model a generating",
    )
    refused = await stack.http.post("/api/v1/models/b/load")
    assert refused.status_code == 409, refused.text
    err = refused.json()["error"]
    assert err["code"] == "insufficient_memory"
    assert "needs 0.5" in err["message"] and "GiB" in err["message"] and "busy" in err["message"]
    assert (await busy).status_code == 200  # the running request was not disturbed
    assert (await stack.http.post("/api/v1/models/b/load")).json()["evicted"] == ["a"]


async def test_a_model_larger_than_the_budget_is_refused(make_stack):
    stack = await make_stack(
        [fake_model("f"), small("big", preload=False)], worker={"memory_limit_gib": 0.25}
    )
    refused = await stack.http.post("/api/v1/models/big/load")
    assert refused.status_code == 409
    msg = refused.json()["error"]["message"]
    assert "weights 0.50 GiB" in msg and "0.25 GiB" in msg and "max_context" in msg
    unknown = await stack.http.post("/api/v1/models/nope/load")
    assert unknown.status_code == 404 and "catalog" in unknown.json()["error"]["message"]


async def test_adapters_are_registered_served_and_removed_at_run_time(make_stack, tmp_path):
    (tmp_path / "ada").mkdir()
    stack = await make_stack([fake_model("base")])
    loaded = await stack.http.post(
        "/api/v1/models/base:ada/load", json={"adapterPath": str(tmp_path / "ada")}
    )
    assert loaded.status_code == 200, loaded.text
    assert await openai_ids(stack) == ["base", "base:ada"]
    entry = (await listing(stack))["base:ada"]
    assert entry["base"] == "base" and entry["state"] == "loaded"
    reply = (await stack.http.post("/v1/chat/completions", json=chat("base:ada"))).json()
    assert reply["choices"][0]["message"]["content"] == "ada0 ada1 ada2 ada3"
    assert reply["model"] == "base:ada"
    base = (await stack.http.post("/v1/chat/completions", json=chat("base"))).json()
    assert base["choices"][0]["message"]["content"] == "w0 w1 w2 w3"

    missing = await stack.http.post("/api/v1/models/base:nope/load")
    assert missing.status_code == 404 and "adapter_path" in missing.json()["error"]["message"]
    bad = await stack.http.post("/api/v1/models/base:x/load", json={"adapterPath": str(tmp_path / "absent")})
    assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]

    assert (await stack.http.post("/api/v1/models/base:ada/unload")).status_code == 200
    assert await openai_ids(stack) == ["base"]
    assert (await stack.http.post("/v1/chat/completions", json=chat("base:ada"))).status_code == 404


async def test_a_base_without_lora_slots_starts_again_with_them_and_no_request_fails(make_stack, tmp_path):
    """As vLLM started without LoRA: the first adapter restarts the base with slots; its
    running request finishes, one sent during the restart waits for it."""
    (tmp_path / "ada").mkdir()
    stack = await make_stack(
        [fake_model("base", engine_args={"slots_for_adapters": True, "token_delay_s": 0.02})]
    )  # 40 tokens: 0.8 s, within the stack's drain of 2 s
    before = stack.worker.models.loaded["base"].engine
    running = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat("base", max_tokens=40)))
    await until(lambda: returns(before.health().running), timeout=10, what="the base generating")
    load = asyncio.create_task(
        stack.http.post("/api/v1/models/base:ada/load", json={"adapterPath": str(tmp_path / "ada")})
    )
    await until(lambda: returns("base" not in stack.worker.models.loaded), timeout=10, what="the restart")
    meanwhile = asyncio.create_task(stack.http.post("/v1/chat/completions", json=chat("base")))
    assert (await load).status_code == 200
    assert (await running).status_code == 200 and (await meanwhile).status_code == 200
    after = stack.worker.models.loaded["base"].engine
    assert after is not before and after.spec.lora_slots == 4
    reply = (await stack.http.post("/v1/chat/completions", json=chat("base:ada"))).json()
    assert reply["choices"][0]["message"]["content"] == "ada0 ada1 ada2 ada3"


async def test_loading_on_a_named_worker(make_stack):
    stack = await make_stack([fake_model("f"), fake_model("g", preload=False)])
    unknown = await stack.http.post("/api/v1/models/g/load", json={"workerId": "nobody"})
    assert unknown.status_code == 400 and "nobody" in unknown.json()["error"]["message"]
    named = await stack.http.post("/api/v1/models/g/load", json={"workerId": stack.worker.worker_id})
    assert named.status_code == 200 and named.json()["workerId"] == stack.worker.worker_id
