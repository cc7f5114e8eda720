"""/v1/embeddings through the official openai client against the running server (the
default model on the transformers engine, pooled): a paraphrase lies closer than an
unrelated sentence, batches equal single calls, float and base64 agree, dimensions, and
refusals by name."""

from __future__ import annotations

import math

import openai
import pytest

from tests.e2e.conftest import MODEL


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_a_paraphrase_is_closer_than_an_unrelated_sentence(client):
    texts = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by ten percent.",
    ]
    reply = client.embeddings.create(model=MODEL, input=texts)  # base64, as the client asks
    cat, paraphrase, revenue = (d.embedding for d in reply.data)
    assert [d.index for d in reply.data] == [0, 1, 2]
    assert cosine(cat, paraphrase) > cosine(cat, revenue) + 0.1
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in (cat, paraphrase, revenue))
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 15
    alone = client.embeddings.create(model=MODEL, input=texts[2], encoding_format="float").data[0]
    assert cosine(alone.embedding, revenue) > 0.9999


def test_dimensions_keep_the_first_values_normalised(client):
    full = client.embeddings.create(model=MODEL, input="hello", encoding_format="float").data[0].embedding
    short = client.embeddings.create(model=MODEL, input="hello", dimensions=64).data[0].embedding
    assert len(short) == 64 and abs(math.sqrt(sum(x * x for x in short)) - 1) < 1e-4
    assert cosine(short, full[:64]) > 0.9999


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"input": [[1, 2, 3]]}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["ok", ""]}, "input"),
        ({"input": "hi", "dimensions": 100000}, "dimensions"),
        ({"input": "word " * 9000}, "input"),
    ],
)
def test_bad_inputs_are_refused_by_name(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, **kwargs)
    assert refused.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="hi")
