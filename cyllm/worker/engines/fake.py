"""A test double: an engine with no model, for gateway/coordinator tests and overhead
benchmarks.  It is never a production default and never counts as a supported engine.

It "generates" the words ``w0 w1 w2 ...`` (one word per token), honouring max_tokens,
stop strings and aborts; with a LoRA adapter named ``a`` it says ``a0 a1 a2 ...``.  ``engine_args``:

- ``token_delay_s`` (float, default 0): sleep between tokens, to make streams last;
- ``hang_after`` (int, optional): after this many tokens the engine wedges, as a stuck
  engine thread would: that request and every later one stop producing, aborts are not
  processed (they stay counted as running), yet the process answers heartbeats.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

from cyllm import errors
from cyllm.worker.engines.base import (
    AbstractEngine,
    EngineHealth,
    Event,
    Finished,
    GenerationRequest,
    ModelCard,
    Started,
    TextDelta,
)
from cyllm.worker.engines.text import StopMatcher
from cyllm.worker.engines.validation import plan_max_tokens, resolve_sampling
from cyllm.worker.settings import ModelSpec

CONTEXT = 4096


class FakeEngine(AbstractEngine):
    name = "fake"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.delay = float(spec.engine_args.get("token_delay_s", 0.0))
        self.hang_after = spec.engine_args.get("hang_after")
        self._running: set[str] = set()
        self._aborted: set[str] = set()
        self._tokens = 0
        self._last_token_at = time.monotonic()
        self._wedged = False
        self._adapters: dict[str, Path] = {}

    async def add_adapter(self, name: str, path: Path) -> None:
        if not Path(path).is_dir():
            raise errors.InvalidRequest(f"adapter folder {path} does not exist", param="adapter_path")
        self._adapters[name] = Path(path)

    async def remove_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise errors.ModelNotFound(f"adapter {name!r} is not loaded", param="model")

    def adapters(self) -> list[str]:
        return list(self._adapters)

    async def load(self) -> ModelCard:
        for name, path in self.spec.adapters.items():
            await self.add_adapter(name, path)
        return ModelCard(self.spec.id, self.spec.max_context or CONTEXT, self.name,
                         self.spec.max_batch_size, "cpu", int(time.time()))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        self.check_adapter(request)
        prefix = request.adapter or "w"
        sampling = resolve_sampling(request.sampling, self.spec.temperature or 1.0, self.spec.top_p or 1.0)
        if request.messages is not None:
            if not request.messages:
                raise errors.InvalidRequest("messages must not be empty", param="messages")
            text = " ".join(c for _, c in request.messages)
        else:
            if not request.prompt:
                raise errors.InvalidRequest("prompt must not be empty", param="prompt")
            text = request.prompt
        prompt_tokens = len(text.split()) or 1
        context = self.spec.max_context or CONTEXT
        max_new = plan_max_tokens(prompt_tokens, sampling.max_tokens, context,
                                  self.spec.default_max_tokens)
        stopper = StopMatcher(sampling.stop)
        rid = request.request_id
        self._running.add(rid)
        try:
            yield Started(prompt_tokens)
            for i in range(max_new):
                if self._wedged or (self.hang_after is not None and i >= int(self.hang_after)):
                    self._wedged = True
                    await asyncio.Event().wait()  # hung: alive, but no progress
                if self.delay:
                    await asyncio.sleep(self.delay)
                if rid in self._aborted:
                    yield Finished("abort", prompt_tokens, i)
                    return
                self._tokens += 1
                self._last_token_at = time.monotonic()
                out, hit = stopper.push(("" if i == 0 else " ") + f"{prefix}{i}")
                if out:
                    yield TextDelta(out, 1)
                if hit:
                    yield Finished("stop", prompt_tokens, i + 1)
                    return
            rest = stopper.flush()
            if rest:
                yield TextDelta(rest, 0)
            yield Finished("length", prompt_tokens, max_new)
        finally:
            if not self._wedged:  # a wedged engine never gets to clean up
                self._running.discard(rid)
                self._aborted.discard(rid)

    async def abort(self, request_id: str) -> None:
        if request_id in self._running:
            self._aborted.add(request_id)

    def health(self) -> EngineHealth:
        return EngineHealth(True, len(self._running), 0, self._tokens, self._last_token_at)

    async def close(self) -> None:
        return None
