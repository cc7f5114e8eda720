"""LangChain's ChatOpenAI (from PyPI) against the running server: what application
frameworks do with the OpenAI surface — structured output (by JSON Schema and by
function calling) and tools bound to the model."""

from __future__ import annotations

import pydantic
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.e2e.conftest import MODEL


class City(pydantic.BaseModel):
    """A city and its country."""

    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return "sunny"


@pytest.fixture
def llm(server) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=f"{server.base_url}/v1",
        api_key="unused",
        model=MODEL,
        temperature=0,
        max_tokens=60,
        max_retries=0,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method):
    city = llm.with_structured_output(City, method=method).invoke("Tell me about Tokyo.")
    assert isinstance(city, City) and city.name


def test_bind_tools(llm):
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
