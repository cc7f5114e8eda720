"""A test double: an engine with no model, for gateway/coordinator tests and overhead
benchmarks.  It is never a production default and never counts as a supported engine.

It "generates" the words ``w0 w1 w2 ...`` (token ``i`` is the word ``w<i>``) through the
same skeleton and end rule as the real engines, so max_tokens, stop strings and resumed
generations behave as they do there (a generation resumed after ``n`` tokens goes on
with ``w<n>``); with a LoRA adapter named ``a`` it says ``a0 a1 a2 ...``.  A prompt
counts one token per word.  ``engine_args``:

- ``token_delay_s`` (float, default 0): sleep between tokens, to make streams last;
- ``hang_after`` (int, optional): after this many tokens the engine wedges, as a stuck
  engine thread would: that request and every later one stop producing, and they stay
  counted as running even after their callers leave, yet the process answers heartbeats;
- ``reply`` (str, optional): what every generation says instead of words, one
  character a token, ending (``stop``) after the last: a model's answer of a chosen
  shape (a tool call, a hostile one);
- ``slots_for_adapters`` (bool, default false): as vLLM, it takes adapters only when
  started with ``lora_slots``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator
from pathlib import Path

from cyllm import errors
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.planning import Plan, SamplingDefaults
from cyllm.worker.engines.text import Stopper
from cyllm.worker.engines.types import EngineHealth, GenerationRequest, ModelCard, Step
from cyllm.worker.settings import ModelSpec

CONTEXT = 4096


class WordDecoder:
    """Token ``i`` is the word ``<prefix><i>``, space-separated."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def push(self, token_id: int) -> str:
        return ("" if token_id == 0 else " ") + f"{self.prefix}{token_id}"

    def flush(self) -> str:
        return ""


class ReplyDecoder:
    """Token ``i`` is the reply's ``i``-th character (the end-of-sequence id is past it)."""

    def __init__(self, reply: str) -> None:
        self.reply = reply

    def push(self, token_id: int) -> str:
        return self.reply[token_id] if token_id < len(self.reply) else ""

    def flush(self) -> str:
        return ""


class FakeEngine(Engine):
    name = "fake"
    library = "the fake engine"

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.delay = float(spec.engine_args.get("token_delay_s", 0.0))
        self.hang_after = spec.engine_args.get("hang_after")
        self.reply: str | None = spec.engine_args.get("reply")
        self.slots_for_adapters = bool(spec.engine_args.get("slots_for_adapters"))
        self._wedged = False
        self._abandoned = 0  # wedged requests whose callers left (never cleaned up)
        self._adapters: dict[str, Path] = {}

    @property
    def adapters_need_restart(self) -> bool:
        return self.slots_for_adapters and not self.spec.lora_slots

    async def add_adapter(self, name: str, path: Path) -> None:
        if self.adapters_need_restart:
            raise errors.NotLoadable(f"model {self.spec.id!r} was started without LoRA slots")
        if not Path(path).is_dir():  # noqa: ASYNC240  (a test double; one stat)
            raise errors.InvalidRequest(f"adapter folder {path} does not exist", param="adapter_path")
        self._adapters[name] = Path(path)

    async def remove_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise errors.ModelNotFound(f"adapter {name!r} is not loaded", param="model")

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def load(self) -> ModelCard:
        self.context_length = self.spec.max_context or CONTEXT
        self.defaults = SamplingDefaults.of(self.spec)
        for name, path in self.spec.adapters.items():
            await self.add_adapter(name, path)
        return ModelCard(
            self.spec.id, self.context_length, self.name, self.spec.max_batch_size, "cpu", int(time.time())
        )

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if not request.messages:
                raise errors.InvalidRequest("messages must not be empty", param="messages")
            text = " ".join(c for _, c in request.messages)
        else:
            if not request.prompt:
                raise errors.InvalidRequest("prompt must not be empty", param="prompt")
            text = request.prompt
        return list(range(len(text.split()) or 1))

    def decoder(self, plan: Plan) -> WordDecoder | ReplyDecoder:
        return ReplyDecoder(self.reply) if self.reply is not None else WordDecoder(plan.adapter or "w")

    def end_ids(self) -> tuple[int, ...]:
        return (len(self.reply),) if self.reply is not None else ()

    def vocab_size(self) -> None:
        return None

    async def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        stopper = Stopper(self.primed_decoder(plan), self.end_ids(), plan.sampling.stop, plan.max_new)
        wedged = False
        try:
            for i in itertools.count(len(plan.resumed)):
                made = i - len(plan.resumed)  # by this engine, for this request
                if self._wedged or (self.hang_after is not None and made >= int(self.hang_after)):
                    self._wedged = wedged = True
                    await asyncio.Event().wait()  # hung: alive, but no progress
                if self.delay:
                    await asyncio.sleep(self.delay)
                step = stopper.push(i)
                if step is not None:
                    yield step
                    if step.finish_reason is not None:
                        return
        finally:
            self._abandoned += wedged

    def health(self) -> EngineHealth:
        h = super().health()
        h.running += self._abandoned
        return h

    async def close(self) -> None:
        return None
