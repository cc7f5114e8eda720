"""What a request used: one record (:class:`Usage`) that the access log writes, and the
usage object each surface answers with (:class:`TokenUsage`, OpenAI's shape; the native
API's is the same in camelCase)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

from pydantic import BaseModel


@dataclass
class Usage:
    """The tokens of one request, over all its choices: the prompt counted once, as
    OpenAI counts it; each choice's completion added as it finishes."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens = max(self.prompt_tokens, prompt_tokens)
        self.completion_tokens += completion_tokens


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> Self:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )
