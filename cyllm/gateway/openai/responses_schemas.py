"""The Responses API's request (``POST /v1/responses``) and its input items, as the
official client and the OpenAI Agents SDK send them, turned into one
``GenerationRequest``: messages, the assistant's ``function_call`` items and the
``function_call_output`` items that answer them become the conversation (assistant
turns with tool calls, tool turns), function ``tools`` and ``tool_choice`` become the
chat surface's ``Toolbox`` (the same grammar for a forced call, the same parser for
``auto``).  What is not built here (hosted tools such as web search, reasoning,
``include``, background runs, conversations) is refused with a 400 naming it."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cyllm import errors
from cyllm.gateway.json_schema import Constraint, constraint_of
from cyllm.gateway.openai.schemas import INT32_MAX
from cyllm.gateway.request import MAX_ITEMS, GenerationRequest, Message, Sampling, ToolCall
from cyllm.gateway.tools import Toolbox, toolbox

# Set (to anything but their off value) → 400 naming the field.
UNSUPPORTED: dict[str, object] = {
    "background": False,
    "reasoning": None,
    "include": [],
    "conversation": None,
    "prompt": None,
    "max_tool_calls": None,
}
RESPONSE_ID = r"^resp_[A-Za-z0-9_-]{1,128}$"


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str = ""
    refusal: str = ""

    def value(self) -> str:
        return self.text or self.refusal


Content = str | Annotated[list[InputText], Field(max_length=MAX_ITEMS)]


def _text(content: Content) -> str:
    return content if isinstance(content, str) else "".join(p.value() for p in content)


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # id, status: as the SDK echoes output items

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Content

    def item(self) -> dict[str, Any]:
        return {"type": "message", "role": self.role, "content": _text(self.content)}


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=1 << 20)

    def item(self) -> dict[str, Any]:
        return {
            "type": "function_call",
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
        }


class FunctionCallOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: Content

    def item(self) -> dict[str, Any]:
        return {"type": "function_call_output", "call_id": self.call_id, "output": _text(self.output)}


ITEMS: dict[str, type[InputMessage | FunctionCallItem | FunctionCallOutput]] = {
    "message": InputMessage,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutput,
}


class FunctionTool(BaseModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4096)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str = Field(max_length=64)


class TextFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # verbosity: a hint this server does not take

    format: TextFormat = Field(default_factory=TextFormat)


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # new SDK fields: refused below when known

    model: str = Field(min_length=1)
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_ITEMS)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    text: TextOptions | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(None, pattern=RESPONSE_ID)
    store: bool = True
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    truncation: Literal["disabled"] | None = None

    def refuse_unsupported(self) -> None:
        for name, off in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name, off) not in (off, None):
                raise errors.InvalidRequest(
                    f"{name} is not supported on /v1/responses by this server", param=name
                )

    def items(self) -> list[dict[str, Any]]:
        """The input as items in one normal form (what is stored, and continued)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        out = []
        for i, raw in enumerate(self.input):
            kind = raw.get("type", "message")
            model = ITEMS.get(kind if isinstance(kind, str) else "")
            if model is None:
                raise errors.InvalidRequest(
                    f"input[{i}]: items of type {str(kind)[:40]!r} are not supported by this server "
                    "(message, function_call, function_call_output)",
                    param=f"input[{i}].type",
                )
            try:
                out.append(model.model_validate(raw).item())
            except ValueError as exc:
                raise errors.InvalidRequest(f"input[{i}]: {str(exc)[:300]}", param=f"input[{i}]") from None
        return out

    def toolbox(self) -> Toolbox | None:
        tools = []
        for i, raw in enumerate(self.tools or ()):
            if raw.get("type") != "function":
                raise errors.InvalidRequest(
                    f"tools[{i}]: tools of type {str(raw.get('type'))[:40]!r} are not supported by this "
                    "server (function tools are)",
                    param=f"tools[{i}].type",
                )
            try:
                tool = FunctionTool.model_validate(raw)
            except ValueError as exc:
                raise errors.InvalidRequest(f"tools[{i}]: {str(exc)[:300]}", param=f"tools[{i}]") from None
            spec = tool.model_dump(exclude_none=True, exclude={"type"})
            tools.append({"type": "function", "function": spec})
        choice: Any = self.tool_choice
        if isinstance(choice, NamedFunction):
            choice = {"type": "function", "function": {"name": choice.name}}
        return toolbox(tools, choice, self.parallel_tool_calls is not False)

    def to_request(self, history: list[dict[str, Any]]) -> GenerationRequest:
        """``history``: the stored conversation ``previous_response_id`` continues."""
        turns = conversation(history + self.items())
        if self.instructions:
            turns.insert(0, Message("system", self.instructions))
        return GenerationRequest(
            self.model,
            messages=turns,
            messages_param="input",
            constraint=self.constraint(),
            tools=self.toolbox(),
            sampling=Sampling(
                max_tokens=self.max_output_tokens, temperature=self.temperature, top_p=self.top_p
            ),
        )

    def constraint(self) -> Constraint | None:
        fmt = self.text.format if self.text else TextFormat()
        if fmt.type == "json_schema" and fmt.schema_ is None:
            raise errors.InvalidRequest("text.format.schema is required for json_schema", param="text.format")
        return constraint_of(fmt.type, fmt.schema_)


def conversation(items: list[dict[str, Any]]) -> list[Message]:
    """Items as chat turns: an assistant message and the function calls after it are one
    assistant turn; each call's output a tool turn."""
    turns: list[Message] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            turns.append(Message(role, item["content"]))
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant":
                turns[-1] = Message("assistant", last.content, (*last.tool_calls, call))
            else:
                turns.append(Message("assistant", "", (call,)))
        else:
            turns.append(Message("tool", item["output"], tool_call_id=item["call_id"]))
    return turns


def stored_items(raw: str) -> list[dict[str, Any]]:
    """A stored conversation (items written by this server)."""
    found = json.loads(raw or "[]")
    return found if isinstance(found, list) else []


def normal_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items (a message's content is a list of parts; a call has an id and a
    status) in the input form a conversation continues from."""
    return [ITEMS[item["type"]].model_validate(item).item() for item in items if item.get("type") in ITEMS]
