"""Function tools (OpenAI's ``tools`` / ``tool_choice``): what the model is held to, and
how its output becomes ``tool_calls``.

- ``tool_choice: "required"`` or a named function: the output is decoded under a JSON
  Schema of the call(s) (``constraint``), so the arguments always validate against the
  function's ``parameters``; ``parallel_tool_calls`` (the default) allows a list of up to
  ``MAX_PARALLEL_CALLS`` calls, ``false`` exactly one.  The answer is calls, never text:
  an identical call repeated counts once (a stream sends calls as they are generated,
  so it shows the repeat), and when the length limit cuts the list the calls finished
  before it are the answer (``finish_reason: length``).
- ``"auto"`` (the default when tools are given): the model decides; calls are read from
  its text (``parse``) in the Hermes format that tool-trained chat templates use
  (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, Qwen2.5, Hermes,
  SmolLM3 and others), or a reply that is only such a JSON object.  A call naming no
  given tool, or whose arguments do not validate, stays text.
- ``"none"``: tools are shown to the model but nothing is read as a call.

The worker renders the tools through the model's chat template where it has a tool
format, else in a documented system preamble (``worker/engines/prompt.py``).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cyllm import errors
from cyllm.gateway.json_schema import PATTERN_BUDGET_S, Constraint, check_schema, valid

PARAM = "tools"
# The most calls one forced answer may hold: the grammar closes the list there (a small
# model otherwise repeats its call until the length limit).
MAX_PARALLEL_CALLS = 8
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclass(frozen=True)
class Toolbox:
    """The request's functions (name -> parameters schema) and its choice;
    ``declared_json``: the tools as given (OpenAI's list, JSON text), for the worker's
    chat template."""

    functions: dict[str, dict[str, Any]]
    choice: str  # "none" | "auto" | "required" | a function's name
    parallel: bool = True
    declared_json: str = "[]"

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")

    def constraint(self) -> Constraint | None:
        """The schema a forced choice decodes under (None for none/auto)."""
        if not self.forced:
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        calls = [_call_schema(n, self.functions[n]) for n in names]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema = (
            {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS}
            if self.parallel and self.choice == "required"
            else one
        )
        # Its parts were checked in toolbox(); the body limit bounds their sum.
        return Constraint("json_schema", json.dumps(schema, separators=(",", ":")))

    def answer(self, text: str, finish: str) -> tuple[str | None, list[Call], str]:
        """A finished output as (its text, its calls, the finish reason).  Under a forced
        choice the output is calls, never text: those complete when the length limit cut
        it (finish ``length``, as OpenAI reports a cut call), each distinct call once.
        Under ``auto``: its calls (``tool_calls``) when it is one, else its text."""
        if self.forced:
            calls = self.parse(text)
            return None, calls, "tool_calls" if calls and finish == "stop" else finish
        calls = self.parse(text) if finish == "stop" else []
        return (None, calls, "tool_calls") if calls else (text, [], finish)

    def parse(self, text: str) -> list[Call]:
        """The calls in a finished output ([] when it is an answer, not a call)."""
        if self.choice == "none":
            return []
        if self.forced:
            found = _complete_values(text)
        else:
            found = [_json(m) for m in _CALL.findall(text)] or [_json(text.strip())]
        deadline = time.monotonic() + PATTERN_BUDGET_S  # for all of this answer's patterns
        calls = [_as_call(c, self.functions, deadline) for c in found]
        made = [c for c in calls if c is not None]
        if not made or len(made) != len(calls):
            return []
        distinct: dict[tuple[str, str], Call] = {}
        for c in made:  # a small model repeats a call; the repeat is not another call
            distinct.setdefault((c.name, c.arguments), c)
        return list(distinct.values())


def _complete_values(text: str) -> list[Any]:
    """The complete JSON values of a forced output: one call, or the calls of a list as
    far as the list got (a cut list keeps its finished calls)."""
    decoder = json.JSONDecoder()
    text = text.strip()
    if not text.startswith("["):
        try:
            value, _ = decoder.raw_decode(text)
        except ValueError:
            return []
        return [value]
    out, pos = [], 1
    while pos < len(text):
        while pos < len(text) and text[pos] in " \n\t\r,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            break  # cut here
        out.append(value)
    return out


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """A forced choice's output read as it is generated, as OpenAI streams calls: a
    call's id and name once its head (``{"name":"…","arguments":``) is complete, then
    the arguments' JSON text piece by piece as it comes.  The grammar puts ``name``
    before ``arguments`` (the schema's order) and ends each call at its arguments'
    closing brace, so the text between is the arguments exactly."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # how far the text is read
        self.index = -1  # the call being read
        self.depth = 0  # inside the arguments: nesting, and string state
        self.in_string = self.escaped = False
        self.in_args = False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The tool-call deltas ``piece`` completes (OpenAI's ``delta.tool_calls`` entries)."""
        self.text += piece
        out: list[dict[str, Any]] = []
        while self.pos < len(self.text):
            if not self.in_args:
                while self.pos < len(self.text) and self.text[self.pos] in " \n\t\r[,]}":
                    self.pos += 1
                head = _HEAD.match(self.text, self.pos)
                if head is None or head.end() == len(self.text):  # incomplete (or spaces may follow)
                    break
                self.index += 1
                self.pos, self.in_args, self.depth = head.end(), True, 0
                out.append(
                    {
                        "index": self.index,
                        "id": f"call_{secrets.token_hex(12)}",
                        "type": "function",
                        "function": {"name": head.group(1), "arguments": ""},
                    }
                )
                continue
            start = self.pos
            while self.pos < len(self.text) and self.in_args:
                self._scan(self.text[self.pos])
                self.pos += 1
            piece = self.text[start : self.pos]
            if out and out[-1]["index"] == self.index and "id" not in out[-1]:
                out[-1]["function"]["arguments"] += piece
            else:
                out.append({"index": self.index, "function": {"arguments": piece}})
        return out

    def _scan(self, c: str) -> None:
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif c == "\\":
                self.escaped = True
            elif c == '"':
                self.in_string = False
        elif c == '"':
            self.in_string = True
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
        if self.depth == 0 and not self.in_string and c not in " \n\t\r":
            self.in_args = False  # a closed object (or a scalar's last character)


def one_per_index(deltas: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Tool-call deltas a chunk each, as OpenAI streams them (a reader taking entry [0]
    of each chunk's deltas must not miss a piece or a call's head)."""
    return [[delta] for delta in deltas]


def toolbox(tools: list[dict[str, Any]] | None, choice: Any, parallel: bool) -> Toolbox | None:
    """The request's tools (OpenAI's list: ``{"type": "function", "function": {...}}``)
    checked (names, parameter schemas) with its choice resolved; None when it gives
    none."""
    if not tools:
        if choice not in (None, "none"):
            raise errors.InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in functions:
            raise errors.InvalidRequest(f"two tools are named {name!r}", param=PARAM)
        params = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        check_schema(params, PARAM, f"tools[{i}].function.parameters")
        functions[name] = params
    declared = json.dumps(tools)
    if choice is None or choice in ("auto", "none", "required"):
        return Toolbox(functions, choice or "auto", parallel, declared)
    name = choice["function"]["name"]
    if name not in functions:
        raise errors.InvalidRequest(
            f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
        )
    return Toolbox(functions, name, parallel, declared)


def _call_schema(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters},
        "required": ["name", "arguments"],
    }


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _as_call(found: Any, functions: dict[str, dict[str, Any]], deadline: float) -> Call | None:
    if not isinstance(found, dict) or found.get("name") not in functions:
        return None
    arguments = found.get("arguments", found.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = _json(arguments)
    if not valid(arguments, functions[found["name"]], deadline):  # its patterns: in time
        return None
    return Call(f"call_{secrets.token_hex(12)}", found["name"], json.dumps(arguments))
