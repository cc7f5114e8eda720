"""Function tools (OpenAI's ``tools`` / ``tool_choice``): what the model is held to, and
how its output becomes ``tool_calls``.

- ``tool_choice: "required"`` or a named function: the output is decoded under a JSON
  Schema of the call(s) (``constraint``), so the arguments always validate against the
  function's ``parameters``; ``parallel_tool_calls`` allows a list of calls.
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
            {"type": "array", "items": one, "minItems": 1}
            if self.parallel and self.choice == "required"
            else one
        )
        # Its parts were checked in toolbox(); the body limit bounds their sum.
        return Constraint("json_schema", json.dumps(schema, separators=(",", ":")))

    def answer(self, text: str, finish: str) -> tuple[str | None, list[Call], str]:
        """A finished output as (its text, its calls, the finish reason): its calls with
        ``tool_calls`` when it is one, else its text (with the finish reason it had)."""
        calls = self.parse(text) if finish == "stop" else []
        return (None, calls, "tool_calls") if calls else (text, [], finish)

    def parse(self, text: str) -> list[Call]:
        """The calls in a finished output ([] when it is an answer, not a call)."""
        if self.choice == "none":
            return []
        if self.forced:
            try:
                found = json.loads(text)
            except ValueError:
                return []
            found = found if isinstance(found, list) else [found]
        else:
            found = [_json(m) for m in _CALL.findall(text)] or [_json(text.strip())]
        deadline = time.monotonic() + PATTERN_BUDGET_S  # for all of this answer's patterns
        calls = [_as_call(c, self.functions, deadline) for c in found]
        made = [c for c in calls if c is not None]
        return made if made and len(made) == len(calls) else []


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
            out.append({"index": self.index, "function": {"arguments": self.text[start : self.pos]}})
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
