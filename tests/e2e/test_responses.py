"""The Responses API through the official openai client against the running server:
text in and out with instructions, an incomplete response at max_output_tokens, the
stream of Responses events, structured output, and what it refuses by name."""

from __future__ import annotations

import json

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
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"reasoning": {"effort": "high"}}, "reasoning"),
        ({"background": True}, "background"),
    ],
)
def test_what_needs_what_is_not_built_is_refused_by_name(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="hi", max_output_tokens=5, **kwargs)
    assert refused.value.body["param"] == param
