"""Turning a request into prompt token ids with a Hugging Face tokenizer: the engines
that tokenise on our side (transformers, vLLM, TensorRT-LLM, MindIE) count and check
prompts the same way, and the chat template is the model's own."""

from __future__ import annotations

from typing import Any

from cyllm import errors
from cyllm.worker.engines.types import GenerationRequest


def messages_of(request: GenerationRequest) -> list[dict[str, str]]:
    assert request.messages is not None
    if not request.messages:
        raise errors.InvalidRequest("messages must not be empty", param="messages")
    return [{"role": r, "content": c} for r, c in request.messages]


def prepare_prompt(tokenizer: Any, request: GenerationRequest) -> list[int]:
    """Token ids for ``request``: its raw prompt, or its messages through the chat template."""
    if request.messages is not None:
        msgs = messages_of(request)
        if not getattr(tokenizer, "chat_template", None):
            raise errors.InvalidRequest(
                "this model has no chat template; send a raw prompt (/v1/completions)",
                param="messages",
            )
        try:
            enc = tokenizer.apply_chat_template(
                msgs, add_generation_prompt=True, tokenize=True, return_dict=True
            )
        except Exception as exc:  # jinja raises on roles or orders a template forbids
            raise errors.InvalidRequest(f"chat template rejected the messages: {exc}") from exc
        return list(enc["input_ids"])
    if not request.prompt:
        raise errors.InvalidRequest("prompt must not be empty", param="prompt")
    return list(tokenizer(request.prompt)["input_ids"])
