"""The engine contract, and the one ``generate`` every library adapter fills in.

``AbstractEngine`` is the contract as the worker sees it: load, generate (an async
iterator of ``types.Event``), health, close, and LoRA adapters.  Validation errors
(:class:`~cyllm.errors.InvalidRequest`) are raised by ``generate`` *before* the first
event, so callers can answer with a clean 4xx.  Closing the stream early (the caller
was cancelled or stopped iterating) aborts the request inside the engine and frees its
slot: that is the only cancellation path, and a normal one, not an error.

``Engine`` is that contract implemented once for every adapter over an inference
library (transformers, vLLM, TensorRT-LLM, MindIE, llama.cpp, and the fake)::

    generate(request)
      1. refuse if the engine is down            down()
      2. refuse an adapter it does not hold      check_adapter()
      3. plan: sampling with the model's         plan() -> prompt_ids()
         defaults, prompt ids, tokens to make
      4. Started, then the library's stream      stream(plan) -> Step*
         read as Steps: text out as TextDelta,
         tokens counted (the progress signal),
         the library's finish reason mapped
      5. Finished; a library exception becomes EngineError naming the library

An adapter implements ``load``, ``close`` and ``stream`` (plus ``prompt_ids`` when it
does not tokenise with a Hugging Face tokenizer).  What every engine must do to a
request — structured outputs, resuming from tokens — belongs here, once.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

from cyllm import errors
from cyllm.worker.engines.planning import Plan, SamplingDefaults, plan_max_tokens
from cyllm.worker.engines.prompt import prepare_prompt
from cyllm.worker.engines.types import (
    EngineHealth,
    Event,
    Finished,
    GenerationRequest,
    ModelCard,
    Started,
    Step,
    TextDelta,
)
from cyllm.worker.settings import ModelSpec


class AbstractEngine(abc.ABC):
    """Load, generate (async iterator of events), health, close.

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
    def health(self) -> EngineHealth: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class RequestTracker:
    """What is in flight and how many tokens came out: the progress signal the
    coordinator's health check reads from heartbeats."""

    def __init__(self) -> None:
        self.running = 0  # generations between Started and their end
        self.waiting = 0  # of the running ones, those the library has not started yet
        self.tokens_generated = 0

    def health(self, down: str) -> EngineHealth:
        return EngineHealth(not down, self.running, self.waiting, self.tokens_generated, down)


class Engine(AbstractEngine):
    """An adapter over one inference library; see the module docstring for the steps."""

    library = "the engine"  # how messages name the library
    # The library's finish reasons -> ours; anything else ends as "stop".
    finish_reasons: Mapping[str, str] = {"stop": "stop", "length": "length", "abort": "abort"}

    # Set by load():
    context_length: int
    defaults: SamplingDefaults
    tokenizer: Any = None  # a Hugging Face tokenizer, for the default prompt_ids

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.tracker = RequestTracker()

    # -- what an adapter implements ------------------------------------------------------

    @abc.abstractmethod
    def stream(self, plan: Plan) -> AsyncIterator[Step]:
        """Run ``plan`` in the library.  Closing this iterator must stop the request
        there (in a ``finally``); the last Step carries a finish reason."""

    def down(self) -> str:
        """Why this engine cannot take a request now ('' when it can)."""
        return ""

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prepare_prompt(self.tokenizer, request)

    # -- the skeleton --------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> Plan:
        """Check ``request`` before anything runs (InvalidRequest naming the field)."""
        sampling = self.defaults.apply(request.sampling)
        prompt_ids = self.prompt_ids(request)
        max_new = plan_max_tokens(len(prompt_ids), sampling.max_tokens, self.context_length,
                                  self.spec.default_max_tokens)
        return Plan(request, sampling, prompt_ids, max_new)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if why := self.down():
            raise errors.EngineError(f"{self.library} engine for {self.spec.id} is down: {why}")
        self.check_adapter(request)
        plan = self.plan(request)
        rid, prompt_tokens, completion = request.request_id, len(plan.prompt_ids), 0
        self.tracker.running += 1
        try:
            yield Started(prompt_tokens)
            async with aclosing(self.stream(plan)) as steps:
                async for step in steps:
                    completion += step.tokens
                    self.tracker.tokens_generated += step.tokens
                    if step.text:
                        yield TextDelta(step.text)
                    if step.finish_reason is not None:
                        reason = self.finish_reasons.get(step.finish_reason, "stop")
                        yield Finished(reason, prompt_tokens, completion)
                        return
            raise errors.EngineError(f"{self.library} ended request {rid} without finishing it")
        except (errors.CyllmError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # the library's own exceptions, whatever their kind
            raise errors.EngineError(f"{self.library} failed on request {rid}: {exc}") from exc
        finally:
            self.tracker.running -= 1

    def health(self) -> EngineHealth:
        return self.tracker.health(self.down())
