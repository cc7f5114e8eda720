"""Function tools through the official openai client against the running server (the
default model, whose chat template has no tool format: the tools reach it in the
system message): a named and a required choice, streamed and not, always valid
arguments; a round trip with a tool message; refusals."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def check_calls(calls, names=None):
    assert calls, "no tool call"
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize(
    "choice, names",
    [
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
        ("required", {"get_weather", "get_time"}),
    ],
)
def test_a_forced_choice_always_calls_with_valid_arguments(client, choice, names):
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            max_tokens=80,
            temperature=0.9,
            seed=seed,
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        assert reply.choices[0].message.content is None
        check_calls(reply.choices[0].message.tool_calls, names)


def test_a_streamed_call_arrives_as_tool_call_deltas(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=80,
            temperature=0,
            stream=True,
            parallel_tool_calls=False,
        )
    )
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # As OpenAI streams a call: id and name first, then the arguments piece by piece.
    first, rest = deltas[0], deltas[1:]
    assert first.id.startswith("call_") and first.function.arguments == "" and len(rest) > 3
    assert {d.index for d in deltas} == {0} and all(d.id is None for d in rest)
    arguments = "".join(d.function.arguments for d in rest)
    jsonschema.validate(json.loads(arguments), PARAMS[first.function.name])
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_parallel_calls_stream_one_index_each(client):
    both = [{"role": "user", "content": "What is the weather and the time in Paris?"}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=both,
            tools=[WEATHER, TIME],
            tool_choice="required",
            max_tokens=120,
            temperature=0,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"name": None, "arguments": ""})
        call["name"] = call["name"] or (d.function.name if d.function else None)
        call["arguments"] += d.function.arguments or ""
    assert sorted(calls) == list(range(len(calls))) and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])
    whole = client.chat.completions.create(
        model=MODEL,
        messages=both,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    assert [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.choices[0].message.tool_calls
    ] == [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]


def test_a_tool_result_goes_back_to_the_model(client):
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        max_tokens=60,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = first.choices[0].message.tool_calls[0]
    conversation = ASK + [
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 18, "sky": "clear"})},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=conversation, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required"}, "tool_choice needs tools"),
        ({"tools": [WEATHER, WEATHER]}, "two tools are named"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                        },
                    }
                ]
            },
            "not a valid JSON Schema",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "cannot be combined",
        ),
    ],
)
def test_bad_tools_are_refused_by_name(client, kwargs, says):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kwargs)
    assert says in refused.value.message
