"""Bad input gets a 4xx in OpenAI's error shape naming the problem; service goes on."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import BOTH_WAYS, fake_model

pytestmark = BOTH_WAYS

CHAT = "/v1/chat/completions"


def assert_error(resp, status, *words):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    for word in words:
        assert word in body["error"]["message"], body
    return body["error"]


async def still_serving(stack):
    ok = await stack.http.post(
        CHAT, json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert ok.status_code == 200
    assert ok.json()["choices"][0]["message"]["content"] == "w0 w1 w2"


@pytest.mark.parametrize(
    "body, words, param",
    [
        ({"messages": [{"role": "user", "content": "x"}]}, ["model", "Field required"], "model"),
        ({"model": "fake"}, ["messages", "Field required"], "messages"),
        ({"model": "fake", "messages": "hello"}, ["messages"], "messages"),
        ({"model": "fake", "messages": []}, ["messages"], "messages"),
        ({"model": "fake", "messages": [{"role": "user", "content": ""}]}, ["no text"], "messages"),
        ({"model": "fake", "messages": [{"role": "wizard", "content": "x"}]}, ["role"], None),
        (
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            ["max_tokens"],
            "max_tokens",
        ),
        (
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"},
            ["max_tokens"],
            "max_tokens",
        ),
        (
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "temperature": 5},
            ["temperature"],
            "temperature",
        ),
        ({"model": "fake", "messages": [{"role": "user", "content": "x"}], "n": 17}, ["n"], "n"),
        (
            {
                "model": "fake",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
            },
            ["tools"],
            "tools",
        ),
        (
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            ["logprobs"],
            None,
        ),
        (
            {
                "model": "fake",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            ["response_format", "fake engine"],
            "response_format",
        ),
        (
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1},
            ["presence_penalty", "fake engine"],
            "presence_penalty",
        ),
    ],
)
async def test_invalid_chat_requests_get_400_naming_the_field(make_stack, body, words, param):
    stack = await make_stack()
    err = assert_error(await stack.http.post(CHAT, json=body), 400, *words)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"].startswith(param)
    await still_serving(stack)


async def test_malformed_json_gets_400(make_stack):
    stack = await make_stack()
    resp = await stack.http.post(
        CHAT, content=b'{"model": "fake", "messages": [', headers={"content-type": "application/json"}
    )
    assert_error(resp, 400, "not valid JSON")
    await still_serving(stack)


async def test_unknown_model_gets_404_naming_it_and_not_the_others(make_stack):
    stack = await make_stack()
    resp = await stack.http.post(
        CHAT, json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
    )
    err = assert_error(resp, 404, "gpt-9", "/v1/models")
    assert "fake" not in err["message"]  # a caller may not be allowed to see every model
    assert err["code"] == "model_not_found"


async def test_max_tokens_beyond_the_context_gets_400(make_stack):
    stack = await make_stack([fake_model(max_context=64)])
    resp = await stack.http.post(
        CHAT, json={"model": "fake", "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}
    )
    err = assert_error(resp, 400, "maximum context length is 64")
    assert err["code"] == "context_length_exceeded"
    await still_serving(stack)


async def test_prompt_longer_than_the_context_gets_400(make_stack):
    stack = await make_stack([fake_model(max_context=64)])
    resp = await stack.http.post("/v1/completions", json={"model": "fake", "prompt": "word " * 100})
    assert_error(resp, 400, "the prompt has 100 tokens")
    await still_serving(stack)


async def test_body_over_the_limit_gets_413(make_stack):
    stack = await make_stack()
    big = {"model": "fake", "messages": [{"role": "user", "content": "x" * 10_000}]}
    err = assert_error(await stack.http.post(CHAT, json=big), 413, "4096 bytes")
    assert err["code"] == "body_too_large"
    await still_serving(stack)


async def test_native_api_refuses_empty_prompt_and_missing_input(make_stack):
    stack = await make_stack()
    assert_error(
        await stack.http.post("/api/v1/inference", json={"modelId": "fake", "prompt": ""}), 400, "prompt"
    )
    assert_error(
        await stack.http.post("/api/v1/inference/stream", json={"modelId": "fake"}),
        400,
        "exactly one of prompt or messages",
    )
    assert_error(await stack.http.post("/api/v1/inference", json={"prompt": "hi"}), 400, "modelId")


async def test_unknown_route_gets_404_in_the_same_shape(make_stack):
    stack = await make_stack()
    assert_error(await stack.http.get("/v1/nothing-here"), 404, "/v1/nothing-here")


@pytest.mark.parametrize(
    "route, body, words",
    [
        (
            "/v1/chat/completions",
            {
                "model": "fake",
                "messages": [
                    {"role": "user", "content": "x"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "\ud800"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                ],
            },
            ["arguments"],
        ),
        (
            "/v1/chat/completions",
            {
                "model": "fake",
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "tool", "tool_call_id": "\ud800", "content": "ok"},
                ],
            },
            ["tool_call_id"],
        ),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "tool", "content": "x"}]},
            ["tool_call_id"],
        ),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"１２": 5}},
            ["logit_bias"],
        ),
        (
            "/v1/chat/completions",
            {"model": "fake", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"9" * 20: 5}},
            ["logit_bias"],
        ),
        (
            "/v1/chat/completions",
            {
                "model": "fake",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40),
                    },
                },
            },
            ["nests deeper"],
        ),
        ("/v1/responses", {"model": "fake", "input": "\ud800"}, ["surrogate"]),
        (
            "/v1/responses",
            {"model": "fake", "input": "x", "previous_response_id": "r"},
            ["previous_response_id"],
        ),
        ("/v1/embeddings", {"model": "fake", "input": ["\ud800"]}, ["surrogate"]),
        ("/v1/embeddings", {"model": "fake", "input": "x"}, ["fake engine does not make embeddings"]),
    ],
)
async def test_hostile_input_on_the_newer_surfaces_gets_400(make_stack, route, body, words):
    stack = await make_stack()
    raw = json.dumps(body)  # ASCII, escaping lone surrogates as JSON allows
    assert_error(
        await stack.http.post(route, content=raw, headers={"content-type": "application/json"}), 400, *words
    )
    await still_serving(stack)


async def test_an_error_names_no_internal_address(make_stack):
    """A dead worker's failure reaches the tenant without the addresses it carried
    (the coordinator's log keeps them)."""
    stack = await make_stack()
    await stack.worker.stop()  # its session breaks: the coordinator cannot reach it
    r = await stack.http.post(
        CHAT, json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert r.status_code in (503, 404), r.text
    message = r.json()["error"]["message"]
    assert "127.0.0.1" not in message and f":{stack.worker.port}" not in message, message
