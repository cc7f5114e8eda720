"""The engine contract every inference backend implements.

An engine turns a :class:`GenerationRequest` into an async stream of typed events::

    Started(prompt_tokens)  TextDelta(text, tokens)*  Finished(reason, usage)

Validation errors (:class:`~cyllm.errors.InvalidRequest`) are raised by ``generate``
*before* the first event, so callers can answer with a clean 4xx.  Closing the stream
early (the caller was cancelled or stopped iterating) aborts the request inside the
engine and frees its slot: that is the normal cancellation path, not an error.
"""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from cyllm import errors


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: the engine's default, bounded by the context
    temperature: float | None = None  # 0: greedy; None: the model's default
    top_p: float | None = None  # None: the model's default
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str | None = None  # raw text, used as is
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content); chat template applied
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None  # a LoRA adapter registered on this engine; None: the base model


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str
    tokens: int


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


Event = Started | TextDelta | Finished


@dataclass
class EngineHealth:
    """What a heartbeat reports: liveness *and* progress."""

    healthy: bool
    running: int
    waiting: int
    tokens_generated: int
    last_token_at: float = field(default_factory=time.monotonic)
    detail: str = ""


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    context_length: int
    engine: str
    max_batch_size: int
    device: str
    created: int


class AbstractEngine(abc.ABC):
    """Load, generate (async iterator of events), abort, health, close.

    Engines that serve LoRA adapters on top of their base model override the three
    adapter methods; a request names its adapter in ``GenerationRequest.adapter``.
    """

    name: str = "abstract"

    async def add_adapter(self, name: str, path: Path) -> None:
        """Register a PEFT-format LoRA folder under ``name`` (base weights stay loaded)."""
        raise errors.InvalidRequest(f"the {self.name} engine does not serve LoRA adapters")

    async def remove_adapter(self, name: str) -> None:
        raise errors.InvalidRequest(f"the {self.name} engine does not serve LoRA adapters")

    def adapters(self) -> list[str]:
        return []

    def check_adapter(self, request: GenerationRequest) -> None:
        """Refuse a request for an adapter this engine does not hold."""
        if request.adapter is not None and request.adapter not in self.adapters():
            raise errors.ModelNotFound(
                f"adapter {request.adapter!r} is not loaded on this engine", param="model")

    @abc.abstractmethod
    async def load(self) -> ModelCard:
        """Load weights and warm up; return what the worker advertises."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream events for ``request``; raise InvalidRequest before the first one."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop ``request_id`` if it is running; a no-op for unknown ids."""

    @abc.abstractmethod
    def health(self) -> EngineHealth: ...

    @abc.abstractmethod
    async def close(self) -> None: ...
