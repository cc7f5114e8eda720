"""A request id follows the request through all three services' logs (the gateway's
access record at INFO, the coordinator's and the worker's at DEBUG when the generation
went as asked); structured fields, and no prompt or completion text."""

from __future__ import annotations

import json
import logging

from cyllm.runtime import JsonFormatter

SECRET_PROMPT = "my-secret-prompt-text"


async def test_request_id_reaches_every_service_and_content_is_not_logged(make_stack, caplog):
    stack = await make_stack()
    caplog.set_level(logging.DEBUG)
    resp = await stack.http.post(
        "/v1/chat/completions",
        headers={"X-Request-ID": "req-abc-123"},
        json={"model": "fake", "max_tokens": 3, "messages": [{"role": "user", "content": SECRET_PROMPT}]},
    )
    # the id is the server's own; the caller's X-Request-ID rides along for the logs
    rid = resp.headers["x-request-id"]
    assert resp.status_code == 200 and rid != "req-abc-123" and len(rid) == 32
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == rid]
    loggers = {r.name for r in mine}
    assert {"cyllm.gateway.access", "cyllm.coordinator.services.inference", "cyllm.worker.service"} <= loggers
    access = next(r for r in mine if r.name == "cyllm.gateway.access")
    assert (access.status, access.route, access.model) == (200, "/v1/chat/completions", "fake")
    assert (access.prompt_tokens, access.completion_tokens) == (1, 3)
    assert access.caller == "anonymous" and access.latency_ms > 0
    line = json.loads(JsonFormatter().format(access))
    assert line["request_id"] == rid and line["client_request_id"] == "req-abc-123"
    assert line["status"] == 200
    everything = "\n".join(r.getMessage() + json.dumps(vars(r), default=str) for r in caplog.records)
    assert SECRET_PROMPT not in everything
    assert "w0 w1 w2" not in everything


async def test_at_info_a_request_that_went_well_is_one_record_and_a_refusal_more(make_stack, caplog):
    """Three records per request at INFO cost the gateway a fifth of a short request's
    CPU; the access record says what an operator needs, and a generation that failed
    upstream still says so where it failed."""
    stack = await make_stack()
    caplog.set_level(logging.INFO)
    ok = await stack.http.post("/v1/completions", json={"model": "fake", "max_tokens": 2, "prompt": "x"})
    assert ok.status_code == 200
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == ok.headers["x-request-id"]]
    assert [r.name for r in mine] == ["cyllm.gateway.access"]
    caplog.clear()
    bad = await stack.http.post("/v1/completions", json={"model": "nope", "max_tokens": 2, "prompt": "x"})
    assert bad.status_code == 404
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == bad.headers["x-request-id"]]
    assert {r.name for r in mine} == {"cyllm.gateway.access", "cyllm.coordinator.services.inference"}
    assert (
        next(r for r in mine if r.name == "cyllm.coordinator.services.inference").outcome == "model_not_found"
    )


async def test_content_is_logged_only_when_enabled(make_stack, caplog):
    stack = await make_stack(gateway={"log_content": True})
    caplog.set_level(logging.INFO)
    await stack.http.post(
        "/v1/completions",
        headers={"X-Request-ID": "req-content"},
        json={"model": "fake", "max_tokens": 2, "prompt": SECRET_PROMPT},
    )
    access = next(
        r
        for r in caplog.records
        if r.name == "cyllm.gateway.access" and getattr(r, "client_request_id", "") == "req-content"
    )
    assert (access.prompt, access.completion) == (SECRET_PROMPT, "w0 w1")


async def test_a_forged_log_line_cannot_be_injected_through_the_path(make_stack, caplog):
    stack = await make_stack()
    caplog.set_level(logging.INFO)
    await stack.http.get("/v1/models%0a2026-01-01 INFO cyllm.gateway.access: GET /admin 200")
    access = [r for r in caplog.records if r.name == "cyllm.gateway.access"]
    assert access and all("\n" not in r.getMessage() for r in access)


async def test_callers_reusing_one_request_id_get_engine_ids_of_their_own(make_stack):
    stack = await make_stack()
    engine = stack.worker.engines["fake"]
    seen: list[str] = []
    generate = engine.generate

    def recording(request):
        seen.append(request.request_id)
        return generate(request)

    engine.generate = recording
    body = {"model": "fake", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(2):
        r = await stack.http.post("/v1/chat/completions", headers={"X-Request-ID": "same"}, json=body)
        assert r.status_code == 200
    assert len(seen) == 2 and len(set(seen)) == 2 and "same" not in seen
