"""instructor and LiteLLM (from PyPI) against the running server, as their docs show
them pointed at an OpenAI-compatible server."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch from the internet

import instructor
import litellm
import numpy as np
import openai
import pydantic
import pytest

from tests.e2e.conftest import MODEL

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class City(pydantic.BaseModel):
    """A city and its country."""

    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


@pytest.mark.parametrize(
    "mode", [instructor.Mode.JSON_SCHEMA, instructor.Mode.TOOLS], ids=["json_schema", "tools"]
)
def test_instructor_fills_a_pydantic_model(server, mode):
    client = instructor.from_openai(
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0), mode=mode
    )
    city = client.chat.completions.create(
        model=MODEL,
        response_model=City,
        messages=[{"role": "user", "content": "Tell me about Tokyo."}],
        max_tokens=60,
        temperature=0,
        max_retries=1,
    )
    assert isinstance(city, City) and city.name and city.country


def test_litellm_as_a_client_completes_streams_and_embeds(server):
    where = {"api_base": f"{server.base_url}/v1", "api_key": "unused", "model": f"openai/{MODEL}"}
    reply = litellm.completion(messages=QUESTION, max_tokens=20, temperature=0, **where)
    assert "Paris" in reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(litellm.completion(messages=QUESTION, max_tokens=21, temperature=0, stream=True, **where))
    assert len(chunks) > 2 and "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks)
    found = litellm.embedding(input=["a cat", "a dog", "the stock market"], **where)
    cat, dog, market = (np.array(d["embedding"]) for d in found.data)
    assert cat @ dog > cat @ market
