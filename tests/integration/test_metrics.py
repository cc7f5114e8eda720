"""Prometheus metrics of all three services move when requests are served."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(url)).text


async def test_metrics_of_gateway_coordinator_and_worker_move(make_stack):
    stack = await make_stack(metrics_port=0)
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    gw0 = (await stack.http.get("/actuator/prometheus")).text
    for _ in range(2):
        assert (await stack.http.post("/v1/chat/completions", json=chat)).status_code == 200
    await stack.http.post("/v1/chat/completions", json={**chat, "model": "nope"})
    gw = (await stack.http.get("/metrics")).text
    route = "/v1/chat/completions"
    assert value(gw, "gateway_requests_total", method="POST", route=route, status="200") == 2
    assert value(gw0, "gateway_requests_total", method="POST", route=route, status="200") == 0
    assert value(gw, "gateway_requests_total", method="POST", route=route, status="404") == 1
    assert value(gw, "gateway_rejected_requests_total", status="404") == 1
    assert value(gw, "gateway_latency_seconds_count", method="POST", route=route) == 3
    assert value(gw, "gateway_time_to_first_token_seconds_count", model="fake") == 2
    assert value(gw, "gateway_inter_token_latency_seconds_count", model="fake") == 6
    assert value(gw, "gateway_generated_tokens_total", model="fake") == 8

    wk = await scrape(f"http://127.0.0.1:{stack.worker.metrics_port}/metrics")
    assert value(wk, "worker_inference_latency_count", model="fake", finish_reason="length") == 2
    assert value(wk, "worker_generated_tokens_total", model="fake") == 8
    assert value(wk, "worker_running_requests", model="fake") == 0
    assert value(wk, "worker_gpu_memory_bytes", device="cpu") > 10_000_000

    await stack.coordinator.metrics.refresh(stack.coordinator.scheduler, stack.coordinator.cache)
    co = await scrape(f"http://127.0.0.1:{stack.coordinator.metrics_port}/metrics")
    assert value(co, "coordinator_inference_requests_total", model="fake", outcome="ok") == 2
    # an unknown model is no label of its own (callers would make unbounded series)
    assert (
        value(co, "coordinator_inference_requests_total", model="(unknown)", outcome="model_not_found") == 1
    )
    assert value(co, "coordinator_inference_requests_total", model="nope", outcome="model_not_found") == 0
    assert value(co, "coordinator_queue_capacity") == 256
    assert value(co, "coordinator_worker_healthy", worker=stack.worker.worker_id) == 1


async def test_cache_hit_rate_and_running_requests(make_stack):
    from tests.integration.conftest import fake_model

    stack = await make_stack([fake_model(engine_args={"token_delay_s": 0.05})], metrics_port=0)
    body = {"model": "fake", "prompt": "same", "max_tokens": 2, "temperature": 0}
    for _ in range(4):  # one miss, three hits
        assert (await stack.http.post("/v1/completions", json=body)).status_code == 200
    await stack.coordinator.metrics.refresh(stack.coordinator.scheduler, stack.coordinator.cache)
    co = await scrape(f"http://127.0.0.1:{stack.coordinator.metrics_port}/metrics")
    assert value(co, "coordinator_cache_hit_rate") == 0.75
    slow = asyncio.create_task(
        stack.http.post("/v1/completions", json={**body, "max_tokens": 40, "temperature": 1})
    )
    await asyncio.sleep(0.5)
    wk = await scrape(f"http://127.0.0.1:{stack.worker.metrics_port}/metrics")
    assert value(wk, "worker_running_requests", model="fake") == 1
    assert (await slow).status_code == 200
