"""llama.cpp (``llama-cpp-python``) for GGUF models, served as they are, no conversion.

llama.cpp has no batching across calls, and one ``Llama`` object used from two threads
at once crashes the process.  So the engine holds ``instances`` objects (default 1),
each used by one request at a time; further requests wait for a free one (reported as
``waiting``).  Each object is built and runs on a thread of its own (``compute_thread``:
from the event loop's pool, one stream ran at 49-151 tok/s, on its own thread at 150); a
generation runs there token by token and checks its abort flag between tokens.  The chat
template is the GGUF's own (``tokenizer.chat_template``), rendered with llama-cpp-python's
Jinja2 formatter.

``engine_args``: ``instances`` (default 1), ``n_threads`` (default: the process's
cores divided among the instances), ``n_batch`` (default 512), and any other
``llama_cpp.Llama`` keyword (``n_gpu_layers``, ``flash_attn``...), passed through.
"""

from __future__ import annotations

import asyncio
import codecs
import inspect
import math
import os
import random
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from cyllm import errors
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.compute_thread import ComputeThread
from cyllm.worker.engines.grammar import Grammars, Matcher
from cyllm.worker.engines.planning import Plan, SamplingDefaults, checked_ids
from cyllm.worker.engines.prompt import messages_of
from cyllm.worker.engines.sampling import OutputRules, token_logprob
from cyllm.worker.engines.text import Stopper
from cyllm.worker.engines.types import GenerationRequest, ModelCard, Step
from cyllm.worker.settings import ModelSpec

_DONE = object()


class LlamaDecoder:
    """llama.cpp's bytes for each token (with the tokens before it as context), decoded
    as UTF-8 as they complete."""

    def __init__(self, llm: Any, prompt_ids: list[int]) -> None:
        self.llm = llm
        self.history = list(prompt_ids)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece = self.llm.detokenize([token_id], prev_tokens=self.history)
        self.history.append(token_id)
        return self.utf8.decode(piece)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class LlamaCppEngine(Engine):
    name = "llama_cpp"
    library = "llama.cpp"
    output_rules = True
    gives_logprobs = True

    def __init__(self, spec: ModelSpec, gguf: Path) -> None:
        if spec.adapters:
            raise errors.NotLoadable(
                f"model {spec.id!r}: the llama_cpp engine does not serve PEFT adapters here; "
                "use the transformers or vllm engine"
            )
        super().__init__(spec)
        self.gguf = gguf
        args = dict(spec.engine_args)
        self.instances = int(args.pop("instances", 1))
        if self.instances < 1:
            raise errors.NotLoadable(f"model {spec.id!r}: instances must be at least 1")
        cores = len(os.sched_getaffinity(0))
        args.setdefault("n_threads", max(1, cores // self.instances))
        args.setdefault("n_batch", 512)
        self.llama_args = args
        self._free: asyncio.Queue[_Instance] = asyncio.Queue()
        self._objects: list[Any] = []
        self._threads: list[ComputeThread] = []
        self.template: str | None = None  # the GGUF's chat template
        self._embedder: Any = None  # a second context on the same (mapped) weights
        self._embed_thread = ComputeThread(f"embed-{spec.cache_name}")

    async def load(self) -> ModelCard:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        known = set(inspect.signature(llama_cpp.Llama.__init__).parameters)
        unknown = sorted(set(self.llama_args) - known)
        if unknown:
            raise errors.NotLoadable(
                f"model {self.spec.id!r}: unknown llama_cpp.Llama argument(s) {', '.join(unknown)}"
            )
        n_ctx = self.spec.max_context or 0  # 0: the model's training context

        def build() -> Any:
            return llama_cpp.Llama(model_path=str(self.gguf), n_ctx=n_ctx, verbose=False, **self.llama_args)

        try:
            for i in range(self.instances):
                thread = ComputeThread(f"llama-{self.spec.cache_name}-{i}")
                self._threads.append(thread)
                self._objects.append(await thread.run(build))
        except Exception as exc:  # ValueError from llama.cpp for unreadable files
            raise errors.NotLoadable(f"llama.cpp could not load {self.gguf}: {exc}") from exc
        for obj, thread in zip(self._objects, self._threads):
            self._free.put_nowait(_Instance(obj, thread))
        llm = self._objects[0]
        self.context_length = llm.n_ctx()
        self.eos = {llm.token_eos()}
        meta = llm.metadata
        template = self.template = meta.get("tokenizer.chat_template")
        self.formatter = None
        if template:
            eos_text = llm.detokenize([llm.token_eos()], special=True).decode(errors="replace")
            bos_id = llm.token_bos()
            bos_text = llm.detokenize([bos_id], special=True).decode(errors="replace") if bos_id >= 0 else ""
            self.formatter = Jinja2ChatFormatter(
                template=template, eos_token=eos_text, bos_token=bos_text, stop_token_ids=[llm.token_eos()]
            )
        self.defaults = SamplingDefaults.of(self.spec)
        return ModelCard(
            self.spec.id, self.context_length, self.name, self.spec.max_batch_size, "cpu", int(time.time())
        )

    async def close(self) -> None:
        self.close_grammars()
        if self._embedder is not None:
            self._embedder.close()
        for obj in self._objects:
            obj.close()
        self._objects.clear()
        for thread in [*self._threads, self._embed_thread]:
            thread.close()

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        """llama.cpp's own pooling (mean), from a second context opened on first use with
        ``embedding=True``: the weights are memory-mapped, so it costs a context, not a
        copy."""
        llm = self._objects[0]
        ids = checked_ids(
            lambda t: llm.tokenize(t.encode(), add_bos=True, special=False),
            texts,
            self.context_length,
            llm.n_embd(),
            dimensions,
        )
        return await self._embed_thread.run(self._embed, list(texts), dimensions), sum(map(len, ids))

    def _embed(self, texts: list[str], dimensions: int) -> list[list[float]]:
        import llama_cpp

        if self._embedder is None:  # on the embedding thread: one call at a time
            n = self.context_length
            self._embedder = llama_cpp.Llama(
                model_path=str(self.gguf),
                n_ctx=n,
                n_batch=n,
                n_ubatch=n,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                verbose=False,
                n_threads=self.llama_args["n_threads"],
            )
        vectors = self._embedder.embed(texts, normalize=False, truncate=False)
        return [_unit(v[:dimensions] if dimensions else v) for v in vectors]

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        llm = self._objects[0]  # tokenising is read-only on the vocabulary
        if request.prompt_token_ids is not None:
            if not request.prompt_token_ids:
                raise errors.InvalidRequest("prompt must not be empty", param="prompt")
            return list(request.prompt_token_ids)  # checked against the vocabulary by plan()
        if request.messages is not None:
            msgs, tools = messages_of(request, self.template)
            if self.formatter is None:
                raise errors.InvalidRequest(
                    "this model has no chat template; send a raw prompt (/v1/completions)", param="messages"
                )
            try:
                # any role's {role, content}; cast: checked alike with and without llama_cpp
                text = self.formatter(messages=cast(Any, msgs), tools=tools).prompt
            except Exception as exc:
                raise errors.InvalidRequest(f"chat template rejected the messages: {exc}") from exc
            return llm.tokenize(text.encode(), add_bos=True, special=True)
        if not request.prompt:
            raise errors.InvalidRequest("prompt must not be empty", param="prompt")
        return llm.tokenize(request.prompt.encode(), add_bos=True, special=False)

    def down(self) -> str:
        return "" if self._objects else "closed"

    def decoder(self, plan: Plan) -> LlamaDecoder:
        return LlamaDecoder(self._objects[0], plan.prompt)  # detokenising is read-only

    def end_ids(self) -> set[int]:
        return self.eos

    def vocab_size(self) -> int:
        return self._objects[0].n_vocab()

    def make_grammars(self) -> Grammars:  # the GGUF's vocabulary as bytes
        llm = self._objects[0]
        return Grammars.for_pieces([llm.detokenize([i]) for i in range(llm.n_vocab())], self.eos)

    async def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        abort = threading.Event()
        out: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.tracker.waiting += 1
        try:
            instance = await self._free.get()
        finally:
            self.tracker.waiting -= 1
        worker: asyncio.Future[None] | None = None
        try:
            worker = instance.thread.run(
                self._run,
                instance.llm,
                plan,
                abort,
                lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
            )
            while (item := await out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            abort.set()  # stops the thread if we leave early (client gone)
            self._release_when_idle(instance, worker)

    def _release_when_idle(self, instance: _Instance, worker: asyncio.Future[Any] | None) -> None:
        """Give the object back only once its thread has stopped using it."""
        if worker is None or worker.done():
            self._free.put_nowait(instance)
        else:
            worker.add_done_callback(lambda _: self._free.put_nowait(instance))

    def _run(self, llm: Any, plan: Plan, abort: threading.Event, emit: Any) -> None:
        """The generation loop, on ``llm``'s own thread."""
        try:
            s = plan.sampling
            llm.set_seed(s.seed if s.seed is not None else random.getrandbits(31))
            stopper = Stopper(self.primed_decoder(plan), self.eos, s.stop, plan.max_new)
            matcher, rules = self.matcher(plan), self.rules(plan)
            seen: list[Any] = []  # the processed scores of the last step (for logprobs)
            tokens = llm.generate(
                plan.prompt_ids,
                temp=s.temperature,
                top_p=s.top_p,
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                reset=True,
                logits_processor=_processed(rules, matcher, seen, s.logprobs is not None),
            )
            decode = lambda i: llm.detokenize([i]).decode(errors="replace")  # noqa: E731
            try:
                for token in tokens:
                    if abort.is_set():
                        return
                    if matcher is not None:
                        matcher.accept(token)
                    if rules is not None:
                        rules.accept(token)
                    logprob = (
                        None if s.logprobs is None else token_logprob(seen[-1], token, s.logprobs, decode)
                    )
                    step = stopper.push(token, logprob)
                    if step is not None:
                        emit(step)
                        if step.finish_reason is not None:
                            return
            finally:
                tokens.close()
        except Exception as exc:
            emit(exc)
        finally:
            emit(_DONE)


@dataclass(frozen=True)
class _Instance:
    """A ``Llama`` object and the one thread that builds and runs it."""

    llm: Any
    thread: ComputeThread


def _processed(rules: OutputRules | None, matcher: Matcher | None, seen: list[Any], keep: bool) -> Any:
    """llama.cpp's logits processor for a request's output rules and its grammar (which
    has the last word): the scores, one per token id in order, changed in place; with
    ``keep``, a copy of them is left in ``seen`` for the token's logprob."""
    if rules is None and matcher is None and not keep:
        return None
    import llama_cpp
    import torch

    def process(input_ids: Any, scores: Any) -> Any:
        logits = torch.from_numpy(scores)
        if rules is not None:
            rules.apply(logits)
        if matcher is not None:
            matcher.apply(logits)
        if keep:
            seen[:] = [logits.clone()]
        return scores

    return llama_cpp.LogitsProcessorList([process])


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]
