"""The Responses API through the official openai client against the running server:
text in and out with instructions, an incomplete response at max_output_tokens, the
stream of Responses events, structured output, function tools (a forced call, its
output sent back with previous_response_id, streamed as the SDK reads it), stored
responses (retrieve, input items, delete, store: false), and what it refuses by name."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def test_text_in_text_out(client):
    reply = client.responses.create(
        model=MODEL,
        input="What is the capital of France?",
        instructions="Answer in one sentence.",
        max_output_tokens=40,
        temperature=0,
    )
    assert reply.status == "completed" and "Paris" in reply.output_text
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 40
    cut = client.responses.create(model=MODEL, input="Write a long story.", max_output_tokens=5)
    assert (cut.status, cut.incomplete_details.reason, cut.usage.output_tokens) == (
        "incomplete",
        "max_output_tokens",
        5,
    )


def test_the_stream_is_responses_events(client):
    events = list(
        client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": "What is the capital of France?"}],
            max_output_tokens=40,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text and "Paris" in deltas
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_structured_output_by_text_format(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}},
        "required": ["name"],
    }
    reply = client.responses.create(
        model=MODEL,
        input="Tokyo as JSON.",
        max_output_tokens=60,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
    )
    assert reply.status == "completed" and isinstance(json.loads(reply.output_text)["name"], str)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
    ],
)
def test_what_needs_what_is_not_built_is_refused_by_name(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": MODEL, "input": "hi", "max_output_tokens": 5, **kwargs})
    assert refused.value.body["param"] == param


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_a_function_call_and_its_output_continue_a_stored_response(client):
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=60,
        temperature=0,
    )
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert client.responses.retrieve(first.id).output[0].call_id == call.call_id  # stored
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C."}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=30,
        temperature=0,
    )
    assert second.previous_response_id == first.id and second.output[0].type == "message"
    assert second.output_text.strip()
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["message", "function_call", "function_call_output"]
    assert items.data[1].call_id == call.call_id
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    unstored = client.responses.create(model=MODEL, input="hi", max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(
            model=MODEL, input="hi", previous_response_id="resp_nothing", max_output_tokens=3
        )


def test_a_forced_call_streams_as_function_call_events(client):
    events = list(
        client.responses.create(
            model=MODEL,
            input="What is the weather in Rome?",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[3:-3]) == {"response.function_call_arguments.delta"}
    pieces = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (item,) = events[-1].response.output
    assert item.type == "function_call" and item.arguments == pieces == events[-3].arguments
    jsonschema.validate(json.loads(pieces), WEATHER["parameters"])
    assert [e.sequence_number for e in events] == list(range(1, len(events) + 1))


def test_a_text_answer_is_continued_by_previous_response_id(client):
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=8, temperature=0)
    second = client.responses.create(
        model=MODEL,
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
    )
    assert second.output_text and second.usage.input_tokens > first.usage.input_tokens
    items = client.responses.input_items.list(second.id, order="asc")
    assert [(i.type, i.role) for i in items.data] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert items.data[1].content[0].text == first.output_text
