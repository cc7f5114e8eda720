"""Function tools at the gateway (what a forced choice decodes under, how calls are read
back) and at the worker (how tools reach a chat template without a tool format)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from cyllm import errors
from cyllm.gateway.tools import toolbox
from cyllm.worker.engines.prompt import TOOL_PREAMBLE, messages_of
from cyllm.worker.engines.types import GenerationRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_a_named_choice_decodes_under_that_function_and_required_under_any():
    named = json.loads(
        toolbox([WEATHER, TIME], {"type": "function", "function": {"name": "get_weather"}}, True)
        .constraint()
        .json_schema
    )
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Oslo"}}, named)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {}}, named)
    required = json.loads(toolbox([WEATHER, TIME], "required", True).constraint().json_schema)
    jsonschema.validate(
        [{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}],
        required,
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    assert toolbox([WEATHER], "auto", True).constraint() is None


@pytest.mark.parametrize(
    "text, names",
    [
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
            ["get_weather"],
        ),
        (
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call><tool_call>{"name": "get_weather", '
            '"arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>',
            ["get_time", "get_weather"],
        ),
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', ["get_weather"]),
        ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', []),  # invalid arguments
        ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', []),  # no such tool
        ("It is sunny in Oslo.", []),
    ],
)
def test_auto_reads_calls_in_the_hermes_format_and_nothing_else(text, names):
    calls = toolbox([WEATHER, TIME], "auto", True).parse(text)
    assert [c.name for c in calls] == names
    assert all(c.id.startswith("call_") and isinstance(json.loads(c.arguments), dict) for c in calls)


def test_none_reads_no_call():
    assert toolbox([WEATHER], "none", True).parse('{"name": "get_weather", "arguments": {"city": "x"}}') == []


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        ([WEATHER, WEATHER], "auto", "tools"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (None, "required", "tool_choice"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"a": {"not": {}}}},
                    },
                }
            ],
            "auto",
            "tools",
        ),
    ],
)
def test_bad_tools_are_refused_by_name(tools, choice, param):
    with pytest.raises(errors.InvalidRequest) as info:
        toolbox(tools, choice, True)
    assert info.value.param == param


def test_a_template_without_tools_gets_them_in_its_system_message():
    request = GenerationRequest(
        "r",
        messages=(
            ("user", "Weather in Oslo?"),
            ("assistant", '<tool_call>\n{"name": "get_weather"}\n</tool_call>'),
            ("tool", '{"temp": 3}'),
        ),
        tools=json.dumps([WEATHER]),
    )
    msgs, tools = messages_of(request, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tools is None and msgs[0]["role"] == "system"
    assert msgs[0]["content"].startswith(TOOL_PREAMBLE) and "get_weather" in msgs[0]["content"]
    assert msgs[-1] == {"role": "user", "content": '<tool_response>\n{"temp": 3}\n</tool_response>'}
    msgs, tools = messages_of(request, "{% if tools %}{{ tools }}{% endif %}")
    assert tools == [WEATHER] and [m["role"] for m in msgs] == ["user", "assistant", "tool"]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_a_call_stream_gives_each_calls_arguments_exactly_however_the_text_is_cut(step):
    from cyllm.gateway.tools import CallStream

    args = ['{"city":"Pa\\"r}is","n":[1,{"a":[2]}],"s":"]}{"}', '{"city":"Rome"}']
    text = f'[{{"name":"get_weather","arguments":{args[0]}}},{{"name":"get_time","arguments":{args[1]}}}]'
    stream, deltas = CallStream(), []
    for i in range(0, len(text), step):
        deltas += stream.feed(text[i : i + step])
    heads = [d for d in deltas if "id" in d]
    assert [(d["index"], d["function"]["name"]) for d in heads] == [(0, "get_weather"), (1, "get_time")]
    assert len({d["id"] for d in heads}) == 2
    got = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == i) for i in (0, 1)]
    assert got == args


def test_a_call_stream_waits_for_a_whole_head():
    from cyllm.gateway.tools import CallStream

    stream = CallStream()
    assert stream.feed('{"name":"get_wea') == []
    assert stream.feed('ther","arguments"') == []
    assert stream.feed(":") == []  # spaces may follow before the arguments
    head, args = stream.feed('{"c')
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert args == {"index": 0, "function": {"arguments": '{"c'}}


def test_a_callers_pattern_cannot_hold_the_gateway():
    """``auto`` reads calls from the model's text and validates their arguments against
    the caller's schema: a catastrophic pattern (Python's ``re`` took minutes on this,
    on the event loop) runs under a time budget, and the call is then not accepted."""
    import time

    evil = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "string", "pattern": "^(a|a)*$"}},
                "required": ["x"],
            },
        },
    }
    box = toolbox([evil], "auto", True)
    text = "".join(
        f'<tool_call>{{"name": "f", "arguments": {{"x": "{"a" * 30}!"}}}}</tool_call>' for _ in range(20)
    )  # twenty of them: one budget for the whole answer
    started = time.perf_counter()
    assert box.parse(text) == []
    assert time.perf_counter() - started < 2.0
    good = '<tool_call>{"name": "f", "arguments": {"x": "aaaa"}}</tool_call>'
    assert [c.name for c in box.parse(good)] == ["f"]  # a pattern that matches still does


def test_a_forced_answer_is_calls_each_distinct_once_and_a_cut_list_keeps_its_finished_calls():
    required = toolbox([WEATHER, TIME], "required", True)
    schema = json.loads(required.constraint().json_schema)
    assert schema["maxItems"] == 8  # the grammar closes the list
    oslo = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    content, calls, finish = required.answer(f"[{oslo}, {oslo}, {oslo}]", "stop")
    assert (content, finish, [(c.name, json.loads(c.arguments)) for c in calls]) == (
        None,
        "tool_calls",
        [("get_weather", {"city": "Oslo"})],
    )
    rome = '{"name": "get_time", "arguments": {"city": "Rome"}}'
    content, calls, finish = required.answer(f'[{oslo}, {rome}, {{"name": "get_wea', "length")
    assert content is None and finish == "length" and [c.name for c in calls] == ["get_weather", "get_time"]
    content, calls, finish = required.answer('[{"name": "get_wea', "length")
    assert (content, calls, finish) == (None, [], "length")  # never raw JSON as the answer
    single = toolbox([WEATHER, TIME], "required", False)
    assert "maxItems" not in json.loads(single.constraint().json_schema)  # exactly one call


def test_streamed_tool_call_chunks_carry_each_index_once():
    from cyllm.gateway.tools import CallStream, one_per_index

    stream = CallStream()
    deltas = stream.feed(
        '[{"name":"get_time","arguments":{"city":"Rome"}},{"name":"get_weather","arguments":{'
    )
    chunks = one_per_index(deltas)
    for c in chunks:
        assert len({d["index"] for d in c}) == len(c)
    assert chunks[0][0]["function"] == {"name": "get_time", "arguments": ""}  # the head alone first
    assert (
        "".join(d["function"]["arguments"] for c in chunks for d in c if d["index"] == 0) == '{"city":"Rome"}'
    )
