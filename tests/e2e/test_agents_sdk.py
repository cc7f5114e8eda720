"""The OpenAI Agents SDK pointed at the running server as its docs show
(``set_default_openai_client``): a tool-using agent on the SDK's default model (the
Responses API) and on its chat-completions model, run and streamed.  The first turn is
forced to call the tool (``tool_choice: required``; the SDK then lets the model answer);
the tool's result goes back to the model and the run ends with an answer."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.e2e.conftest import MODEL

agents = pytest.importorskip("agents")


def _agent(calls: list[str], model=MODEL):
    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 degrees in {city}."

    return agents.Agent(
        name="weather",
        instructions="You answer questions about the weather. Use the get_weather tool.",
        tools=[get_weather],
        model=model,
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
    )


async def _run(agent, streamed: bool):
    if not streamed:
        return await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
    run = agents.Runner.run_streamed(agent, "What is the weather in Paris?", max_turns=4)
    kinds = [event.type async for event in run.stream_events()]
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    return run


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_a_tool_using_agent_runs_on_the_server(server, api):
    async def scenario() -> None:
        # one event loop for the client's life (its connections belong to it)
        client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
        agents.set_tracing_disabled(True)
        agents.set_default_openai_client(client, use_for_tracing=False)
        agents.set_default_openai_api(api)
        for streamed in (False, True):
            calls: list[str] = []
            result = await _run(_agent(calls), streamed)
            assert calls and all(city.strip() for city in calls), calls
            items = [i.type for i in result.new_items]
            assert "tool_call_item" in items and "tool_call_output_item" in items, items
            assert isinstance(result.final_output, str) and result.final_output.strip(), result.final_output
        await client.close()

    try:
        asyncio.run(scenario())
    finally:
        agents.set_default_openai_api("responses")
