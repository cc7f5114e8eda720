"""Request checks every engine applies the same way, with messages that name the fix."""

from __future__ import annotations

from dataclasses import replace

from cyllm import errors
from cyllm.worker.engines.base import SamplingParams


def plan_max_tokens(
    prompt_tokens: int, requested: int | None, context: int, default: int
) -> int:
    """How many tokens to generate, or a ContextLengthExceeded naming the numbers."""
    if prompt_tokens >= context:
        raise errors.ContextLengthExceeded(
            f"the prompt has {prompt_tokens} tokens, but this model's maximum context "
            f"length is {context} tokens",
            param="messages",
        )
    if requested is None:
        return min(default, context - prompt_tokens)
    if requested < 1:
        raise errors.InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    if prompt_tokens + requested > context:
        raise errors.ContextLengthExceeded(
            f"this model's maximum context length is {context} tokens, but you requested "
            f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} "
            "for the completion); reduce the prompt or max_tokens",
            param="max_tokens",
        )
    return requested


def resolve_sampling(p: SamplingParams, temperature: float, top_p: float) -> SamplingParams:
    """Fill what the request left unset with the model's defaults, then check it."""
    resolved = replace(
        p,
        temperature=temperature if p.temperature is None else p.temperature,
        top_p=top_p if p.top_p is None else p.top_p,
    )
    check_sampling(resolved)
    return resolved


def check_sampling(p: SamplingParams) -> None:
    if not 0 <= p.temperature <= 2:
        raise errors.InvalidRequest("temperature must be between 0 and 2", param="temperature")
    if not 0 < p.top_p <= 1:
        raise errors.InvalidRequest("top_p must be in (0, 1]", param="top_p")
