"""llama.cpp (``llama-cpp-python``) for GGUF models, served as they are, no conversion.

llama.cpp has no batching across calls, and one ``Llama`` object used from two threads
at once crashes the process.  So the engine holds ``instances`` objects (default 1),
each used by one request at a time; further requests wait for a free one (reported as
``waiting``).  Each generation runs token by token in a worker thread and checks its
abort flag between tokens.  The chat template is the GGUF's own
(``tokenizer.chat_template``), rendered with llama-cpp-python's Jinja2 formatter.

``engine_args``: ``instances`` (default 1), ``n_threads`` (default: the process's
cores divided among the instances), ``n_batch`` (default 512), and any other
``llama_cpp.Llama`` keyword (``n_gpu_layers``, ``flash_attn``...), passed through.
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
from cyllm.worker.engines.prompt import messages_of
from cyllm.worker.engines.text import StopMatcher
from cyllm.worker.engines.tracking import RequestTracker
from cyllm.worker.engines.validation import plan_max_tokens, resolve_sampling
from cyllm.worker.settings import ModelSpec

_DONE = object()


class LlamaCppEngine(AbstractEngine):
    name = "llama_cpp"

    def __init__(self, spec: ModelSpec, gguf: Path) -> None:
        if spec.adapters:
            raise errors.NotLoadable(
                f"model {spec.id!r}: the llama_cpp engine does not serve PEFT adapters here; "
                "use the transformers or vllm engine")
        self.spec = spec
        self.gguf = gguf
        args = dict(spec.engine_args)
        self.instances = int(args.pop("instances", 1))
        if self.instances < 1:
            raise errors.NotLoadable(f"model {spec.id!r}: instances must be at least 1")
        cores = len(os.sched_getaffinity(0))
        args.setdefault("n_threads", max(1, cores // self.instances))
        args.setdefault("n_batch", 512)
        self.llama_args = args
        self.tracker = RequestTracker()
        self._free: asyncio.Queue[Any] = asyncio.Queue()
        self._objects: list[Any] = []
        self._aborts: dict[str, threading.Event] = {}

    async def load(self) -> ModelCard:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        known = set(inspect.signature(llama_cpp.Llama.__init__).parameters)
        unknown = sorted(set(self.llama_args) - known)
        if unknown:
            raise errors.NotLoadable(
                f"model {self.spec.id!r}: unknown llama_cpp.Llama argument(s) {', '.join(unknown)}")
        n_ctx = self.spec.max_context or 0  # 0: the model's training context

        def build() -> Any:
            return llama_cpp.Llama(model_path=str(self.gguf), n_ctx=n_ctx, verbose=False,
                                   **self.llama_args)

        try:
            for _ in range(self.instances):
                self._objects.append(await asyncio.to_thread(build))
        except Exception as exc:  # ValueError from llama.cpp for unreadable files
            raise errors.NotLoadable(f"llama.cpp could not load {self.gguf}: {exc}") from exc
        for obj in self._objects:
            self._free.put_nowait(obj)
        llm = self._objects[0]
        self.context_length = llm.n_ctx()
        self.eos = {llm.token_eos()}
        meta = llm.metadata
        template = meta.get("tokenizer.chat_template")
        self.formatter = None
        if template:
            eos_text = llm.detokenize([llm.token_eos()], special=True).decode(errors="replace")
            bos_id = llm.token_bos()
            bos_text = llm.detokenize([bos_id], special=True).decode(errors="replace") if bos_id >= 0 else ""
            self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos_text,
                                                 bos_token=bos_text, stop_token_ids=[llm.token_eos()])
        self.temperature = self.spec.temperature if self.spec.temperature is not None else 1.0
        self.top_p = self.spec.top_p if self.spec.top_p is not None else 1.0
        return ModelCard(self.spec.id, self.context_length, self.name, self.spec.max_batch_size,
                         "cpu", int(time.time()))

    async def close(self) -> None:
        for obj in self._objects:
            obj.close()
        self._objects.clear()

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        llm = self._objects[0]  # tokenising is read-only on the vocabulary
        if request.messages is not None:
            msgs = messages_of(request)
            if self.formatter is None:
                raise errors.InvalidRequest(
                    "this model has no chat template; send a raw prompt (/v1/completions)",
                    param="messages")
            try:
                text = self.formatter(messages=msgs).prompt
            except Exception as exc:
                raise errors.InvalidRequest(f"chat template rejected the messages: {exc}") from exc
            return llm.tokenize(text.encode(), add_bos=True, special=True)
        if not request.prompt:
            raise errors.InvalidRequest("prompt must not be empty", param="prompt")
        return llm.tokenize(request.prompt.encode(), add_bos=True, special=False)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        if not self._objects:
            raise errors.EngineError(f"llama.cpp engine for {self.spec.id} is closed")
        self.check_adapter(request)
        sampling = resolve_sampling(request.sampling, self.temperature, self.top_p)
        prompt_ids = self._prompt_ids(request)
        max_new = plan_max_tokens(len(prompt_ids), sampling.max_tokens, self.context_length,
                                  self.spec.default_max_tokens)
        rid = request.request_id
        abort = self._aborts.setdefault(rid, threading.Event())
        out: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.tracker.start(rid)
        self.tracker.waiting += 1
        llm: Any = None
        worker: asyncio.Future[None] | None = None
        try:
            yield Started(len(prompt_ids))
            llm = await self._free.get()
            self.tracker.waiting -= 1
            worker = asyncio.ensure_future(asyncio.to_thread(
                self._run, llm, prompt_ids, max_new, sampling, abort,
                lambda item: loop.call_soon_threadsafe(out.put_nowait, item)))
            while True:
                item = await out.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise errors.EngineError(f"llama.cpp failed on request {rid}: {item}") from item
                if isinstance(item, TextDelta):
                    self.tracker.produced(item.tokens)
                yield item
                if isinstance(item, Finished):
                    break
            await worker
        finally:
            if llm is None:
                self.tracker.waiting -= 1
            abort.set()  # stops the thread if we leave early (client gone)
            self.tracker.finish(rid)
            self._aborts.pop(rid, None)
            if llm is not None:
                self._release_when_idle(llm, worker)

    def _release_when_idle(self, llm: Any, worker: asyncio.Future[Any] | None) -> None:
        """Give the object back only once its thread has stopped using it."""
        if worker is None or worker.done():
            self._free.put_nowait(llm)
        else:
            worker.add_done_callback(lambda _: self._free.put_nowait(llm))

    def _run(self, llm: Any, prompt_ids: list[int], max_new: int, sampling: Any,
             abort: threading.Event, emit: Any) -> None:
        """The generation loop, on a worker thread that owns ``llm`` until it returns."""
        try:
            llm.set_seed(sampling.seed if sampling.seed is not None else random.getrandbits(31))
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stopper = StopMatcher(sampling.stop)
            generated, unreported, reason = 0, 0, "length"
            history = list(prompt_ids)
            tokens = llm.generate(prompt_ids, temp=sampling.temperature, top_p=sampling.top_p,
                                  top_k=0, min_p=0.0, repeat_penalty=1.0, reset=True)
            try:
                for token in tokens:
                    if abort.is_set():
                        reason = "abort"
                        break
                    generated += 1
                    unreported += 1
                    if token in self.eos:
                        reason = "stop"
                        break
                    piece = llm.detokenize([token], prev_tokens=history)
                    history.append(token)
                    text, hit = stopper.push(decoder.decode(piece))
                    if text:
                        emit(TextDelta(text, unreported))
                        unreported = 0
                    if hit:
                        reason = "stop"
                        break
                    if generated >= max_new:
                        break
            finally:
                tokens.close()
            if reason == "length":
                rest = stopper.flush() + decoder.decode(b"", final=True)
                if rest:
                    emit(TextDelta(rest, unreported))
                    unreported = 0
            emit(Finished(reason, len(prompt_ids), generated))
        except Exception as exc:
            emit(exc)
        finally:
            emit(_DONE)

    async def abort(self, request_id: str) -> None:
        event = self._aborts.get(request_id)
        if event is not None:
            event.set()

    def health(self) -> EngineHealth:
        return self.tracker.health(bool(self._objects), "" if self._objects else "closed")
