"""A request id follows the request through all three services' logs; structured
fields, and no prompt or completion text."""

from __future__ import annotations

import json
import logging

from cyllm.runtime import JsonFormatter

SECRET_PROMPT = "my-secret-prompt-text"


async def test_request_id_reaches_every_service_and_content_is_not_logged(make_stack, caplog):
    stack = await make_stack()
    caplog.set_level(logging.INFO)
    resp = await stack.http.post(
        "/v1/chat/completions", headers={"X-Request-ID": "req-abc-123"},
        json={"model": "fake", "max_tokens": 3, "messages": [{"role": "user", "content": SECRET_PROMPT}]})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "req-abc-123"
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == "req-abc-123"]
    loggers = {r.name for r in mine}
    assert {"cyllm.gateway.access", "cyllm.coordinator.service", "cyllm.worker.service"} <= loggers
    access = next(r for r in mine if r.name == "cyllm.gateway.access")
    assert (access.status, access.route, access.model) == (200, "/v1/chat/completions", "fake")
    assert (access.prompt_tokens, access.completion_tokens) == (1, 3)
    assert access.caller == "anonymous" and access.latency_ms > 0
    line = json.loads(JsonFormatter().format(access))
    assert line["request_id"] == "req-abc-123" and line["status"] == 200
    everything = "\n".join(r.getMessage() + json.dumps(vars(r), default=str) for r in caplog.records)
    assert SECRET_PROMPT not in everything
    assert "w0 w1 w2" not in everything


async def test_content_is_logged_only_when_enabled(make_stack, caplog):
    stack = await make_stack(gateway={"log_content": True})
    caplog.set_level(logging.INFO)
    await stack.http.post("/v1/completions", headers={"X-Request-ID": "req-content"},
                          json={"model": "fake", "max_tokens": 2, "prompt": SECRET_PROMPT})
    access = next(r for r in caplog.records
                  if r.name == "cyllm.gateway.access" and getattr(r, "request_id", "") == "req-content")
    assert (access.prompt, access.completion) == (SECRET_PROMPT, "w0 w1")
