"""Structured outputs through the official openai client against the running server
(the default model, the transformers engine): ``parse()`` with pydantic models, a set of
JSON Schemas whose finished outputs must validate every time, JSON objects, streaming,
and schemas refused with a 400 that names what is wrong."""

from __future__ import annotations

import json
import threading
import time
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

from tests.e2e.conftest import MODEL


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population: int = pydantic.Field(ge=0, le=50_000_000)


class Trip(pydantic.BaseModel):
    destination: City
    days: int = pydantic.Field(ge=1, le=30)
    season: Literal["spring", "summer", "autumn", "winter"]
    companions: list[str] = pydantic.Field(max_length=3)
    budget_eur: int | None = pydantic.Field(default=None, ge=0, le=100_000)


SCHEMAS = {
    "nested objects": Trip.model_json_schema(),
    "arrays with bounds": {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {"type": "string", "maxLength": 40},
                "minItems": 2,
                "maxItems": 4,
            }
        },
        "required": ["steps"],
    },
    "enums": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "calm"]}, "level": {"enum": [1, 2, 3]}},
        "required": ["mood", "level"],
    },
    "nullable fields": {
        "type": "object",
        "properties": {
            "nickname": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
            "age": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 120}, {"type": "null"}]},
        },
        "required": ["nickname", "age"],
    },
}
ASKS = [
    "Plan a short trip as JSON.",
    "How do I make tea? Answer as JSON.",
    "How do you feel today? Answer as JSON.",
    "Describe a cat as JSON.",
]


def test_parse_fills_a_pydantic_model(client):
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the name, country and population of Tokyo as JSON."}],
        response_format=City,
        max_tokens=80,
        temperature=0,
    )
    city = reply.choices[0].message.parsed
    assert reply.choices[0].finish_reason == "stop" and isinstance(city, City), reply
    assert 0 <= city.population <= 50_000_000


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_finished_output_validates(client, name):
    schema, finished = SCHEMAS[name], 0
    for i, ask in enumerate(ASKS):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": ask}],
            max_tokens=120,
            temperature=0.8,
            seed=i,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": name.replace(" ", "_"), "schema": schema, "strict": True},
            },
        )
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length"), choice
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), schema)
            finished += 1
    assert finished >= len(ASKS) // 2, f"only {finished} of {len(ASKS)} finished"


def test_json_object_and_a_streamed_schema(client):
    reply = client.chat.completions.create(
        model=MODEL,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[
            {
                "role": "user",
                "content": 'Answer with a JSON object whose only key is "answer": what is 2 + 2?',
            }
        ],
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    stream = client.chat.completions.create(
        model=MODEL,
        max_tokens=80,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": "Tokyo as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": City.model_json_schema()},
        },
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    City.model_validate_json(text)


@pytest.mark.parametrize(
    "response_format, says",
    [
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            "not a valid JSON Schema at type",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
                },
            },
            "uses 'not' at #/properties/a",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
                },
            },
            "cannot be used for constrained decoding",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": json.loads('{"type": "array", "items": ' * 40 + "{}" + "}" * 40),
                },
            },
            "nests deeper than",
        ),
        ({"type": "json_schema"}, "json_schema goes with type"),
        ({"type": "xml"}, "response_format"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused_by_name(client, response_format, says):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            response_format=response_format,
        )
    assert says in refused.value.message
    assert refused.value.body["param"] == "response_format" or "response_format" in says
    # and the server still answers
    assert client.chat.completions.create(
        model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}]
    ).choices


def test_a_schema_too_slow_to_compile_is_refused_while_other_streams_flow(client):
    """xgrammar has no deadline of its own: this schema (100 properties of nested counted
    repetitions, 8 KB) takes about two minutes of its CPU.  The worker refuses it after
    its deadline (10 s by default, its compile killed), and meanwhile every other stream
    keeps coming."""
    slow = {
        "type": "object",
        "properties": {
            f"p{i}": {
                "type": "string",
                "pattern": "^([a-z0-9]{1,32}\\.){1,32}[a-z]{2,%s}$".replace("%s", str(8 + i)),
            }
            for i in range(100)
        },
    }
    refused: list[openai.BadRequestError] = []

    def hostile() -> None:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=5,
                response_format={"type": "json_schema", "json_schema": {"name": "slow", "schema": slow}},
            )
        refused.append(caught.value)

    attacker = threading.Thread(target=hostile)
    attacker.start()
    longest, streams = 0.0, 0
    while attacker.is_alive() and streams < 100:
        streams += 1
        last = time.perf_counter()
        for _ in client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=48,
            stream=True,
        ):
            now = time.perf_counter()
            longest, last = max(longest, now - last), now
    attacker.join(timeout=120)
    assert refused, "the schema was not refused"
    assert "did not compile for constrained decoding within 10 s" in refused[0].message
    assert refused[0].body["param"] == "response_format"
    assert streams >= 2 and longest < 3.0, (streams, longest)
