"""Turning a request into prompt token ids with a Hugging Face tokenizer: the engines
that tokenise on our side (transformers, vLLM, TensorRT-LLM, MindIE) count and check
prompts the same way, and the chat template is the model's own."""

from __future__ import annotations

import json
from typing import Any

from cyllm import errors
from cyllm.worker.engines.types import GenerationRequest

TOOL_CALL = "<tool_call>\n{}\n</tool_call>"
# How tools reach a model whose chat template has no tool format (the Hermes format that
# tool-trained templates use; the gateway reads calls back in it: gateway/tools.py).
TOOL_PREAMBLE = (
    "You can call functions. To call one, reply with only\n"
    + TOOL_CALL.format('{"name": <function name>, "arguments": <a JSON object>}')
    + "\nand nothing else. The functions:\n"
)


def messages_of(
    request: GenerationRequest, template: str | None = None
) -> tuple[list[dict[str, str]], list[Any] | None]:
    """The chat as the template takes it, and the tools when the template renders them
    itself (its source mentions ``tools``); otherwise the tools go into the system
    message (``TOOL_PREAMBLE``) and tool results become user turns."""
    assert request.messages is not None
    if not request.messages:
        raise errors.InvalidRequest("messages must not be empty", param="messages")
    msgs = [{"role": r, "content": c} for r, c in request.messages]
    tools = json.loads(request.tools) if request.tools else None
    if (template and "tools" in template) or (
        tools is None and all(r != "tool" for r, _ in request.messages)
    ):
        return msgs, tools
    for m in msgs:
        if m["role"] == "tool":
            m["role"], m["content"] = "user", f"<tool_response>\n{m['content']}\n</tool_response>"
    if tools is not None:
        preamble = TOOL_PREAMBLE + "\n".join(json.dumps(t) for t in tools)
        if msgs[0]["role"] == "system":
            msgs[0] = {"role": "system", "content": f"{msgs[0]['content']}\n\n{preamble}"}
        else:
            msgs.insert(0, {"role": "system", "content": preamble})
    return msgs, None


def prepare_prompt(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids for ``request``: its raw prompt, or its messages through the chat template
    (or the ids it was given)."""
    if request.prompt_token_ids is not None:
        vocab = len(tokenizer)
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None or not request.prompt_token_ids:
            raise errors.InvalidRequest(
                f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})"
                if bad is not None
                else "prompt must not be empty",
                param="prompt",
            )
        return list(request.prompt_token_ids)
    if request.messages is not None:
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise errors.InvalidRequest(
                "this model has no chat template; send a raw prompt (/v1/completions)",
                param="messages",
            )
        msgs, tools = messages_of(request, template if isinstance(template, str) else None)
        try:
            enc = tokenizer.apply_chat_template(
                msgs, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # jinja raises on roles or orders a template forbids
            raise errors.InvalidRequest(f"chat template rejected the messages: {exc}") from exc
        return list(enc["input_ids"])
    if not request.prompt:
        raise errors.InvalidRequest("prompt must not be empty", param="prompt")
    return list(tokenizer(request.prompt)["input_ids"])
