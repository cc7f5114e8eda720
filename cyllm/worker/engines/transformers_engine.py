"""The PyTorch + Hugging Face transformers engine, with continuous batching.

One scheduler thread owns the model.  Each iteration it (1) drops aborted requests,
(2) prefills newly arrived requests together and merges them into the running batch,
(3) runs one decode step for every running sequence, (4) samples, detokenises, checks
stop conditions and hands the events to the asyncio loop in one call.  Requests that
arrive mid-flight join at the next iteration instead of waiting for the batch to end.

Runs on CPU and on CUDA unchanged (``device: auto`` picks CUDA when present).

LoRA adapters (PEFT folders) are served on top of the loaded base model without copying
it: the model is wrapped in a ``PeftModel`` once, each adapter is loaded under its name,
and every forward pass names the adapter of each row (``adapter_names``, PEFT's mixed
adapter batches), so requests for different adapters and for the base model share one
batch.  Adapters are added and removed by the scheduler thread between steps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cyllm import errors
from cyllm.worker.devices import cpu_has_bfloat16
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.grammar import Grammars, Matcher
from cyllm.worker.engines.hf_batch import KVBatch
from cyllm.worker.engines.hf_embed import base_backbone, pooled
from cyllm.worker.engines.planning import Plan, SamplingDefaults, checked_ids
from cyllm.worker.engines.sampling import (
    OutputRules,
    make_generator,
    process_rows,
    sample,
    token_logprob,
)
from cyllm.worker.engines.text import Stopper
from cyllm.worker.engines.types import EngineHealth, ModelCard, SamplingParams, Step, TokenLogprob
from cyllm.worker.model_files import context_length
from cyllm.worker.settings import ModelSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

# Prompt tokens (rows x padded width) prefilled in one forward pass at most.
_PREFILL_TOKEN_BUDGET = 8192
_SCORE_ROWS = 256  # prompt positions scored at once (a block of float32 log-softmax rows)


# Eager attention's scores of one forward pass, float32, at most (see eager_fits).
_EAGER_SCORES_BYTES = 64 << 20


def eager_fits(rows: int, width: int, heads: int) -> bool:
    """Whether eager attention's scores for ``rows`` x ``width`` new tokens stay small.
    It holds every query's scores against every key at once (a decode step: one row of
    scores per sequence; a prompt: its length squared), where the fused kernel works in
    tiles; two 4k-token prompts would hold over a gigabyte per layer."""
    return rows * heads * width * width * 4 <= _EAGER_SCORES_BYTES


@dataclass(eq=False)  # compared by identity: two requests may carry the same id
class _Sequence:
    prompt_ids: list[int]
    sampling: SamplingParams
    out: asyncio.Queue[Step | BaseException]
    stopper: Stopper
    generator: Any = None
    adapter: str | None = None
    matcher: Matcher | None = None  # the response format's grammar, where one is asked
    rules: OutputRules | None = None  # penalties, logit bias, min_tokens, where asked
    last_token: int = 0
    done: bool = False
    events: list[Step | BaseException] = field(default_factory=list)


class TransformersEngine(Engine):
    name = "transformers"
    library = "transformers"
    output_rules = True
    gives_logprobs = True
    gives_prompt_logprobs = True

    # Set by load(): a transformers causal LM, or a PeftModel around one (which passes
    # its attributes through); its config's fields depend on the architecture.
    model: Any

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        super().__init__(spec)
        self.model_dir = model_dir
        self._inbox: queue.SimpleQueue[_Sequence] = queue.SimpleQueue()
        self._aborts: set[_Sequence] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: list[_Sequence] = []
        self._waiting: list[_Sequence] = []
        self._admitting: list[_Sequence] = []
        self._adapters: dict[str, Path] = {}
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]]] = queue.SimpleQueue()

    # -- lifecycle --------------------------------------------------------------------

    async def load(self) -> ModelCard:
        # Loaded on the scheduler thread, which then steps it: a model computes on one
        # thread for its life (compute_thread says why; 20 ms a decode step instead of 30).
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.spec.id}", daemon=True)
        self._thread.start()
        try:
            await self.on_engine_thread(self._load_blocking)
        except BaseException:
            await self.close()
            raise
        return ModelCard(
            model_id=self.spec.id,
            context_length=self.context_length,
            engine=self.name,
            max_batch_size=self.spec.max_batch_size,
            device=str(self.device),
            created=int(time.time()),
        )

    def pick_device(self) -> torch.device:
        device = self.spec.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(device)

    def load_tokenizer(self) -> Any:
        return AutoTokenizer.from_pretrained(self.model_dir)

    def load_weights(self, dtype: torch.dtype) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, **self.spec.engine_args)

    # bfloat16 on accelerators and on CPUs with native bfloat16 arithmetic (AVX-512 BF16,
    # AMX, Arm BF16: about 2x float32 at 8 and 32 streams, measured), float32 on other
    # CPUs, where bfloat16 matmuls are emulated and slow.
    default_dtypes = {"cuda": "bfloat16", "npu": "float16"}

    def _load_blocking(self) -> None:
        self.device = self.pick_device()
        dtype_name: str = self.spec.dtype
        if dtype_name == "auto":
            cpu = "bfloat16" if cpu_has_bfloat16() else "float32"
            dtype_name = self.default_dtypes.get(self.device.type, cpu)
        self.tokenizer = self.load_tokenizer()
        model = self.load_weights(getattr(torch, dtype_name))
        if self.spec.peft_adapter is not None:
            model = _apply_peft(model, self.spec.peft_adapter)
        self.model = model.to(self.device).eval()
        self.context_length = context_length(self.model.config, self.spec.max_context)
        gen_cfg = self.model.generation_config
        # The model's own sampling defaults count only where it samples by default.
        sampled = bool(getattr(gen_cfg, "do_sample", False))
        self.defaults = SamplingDefaults.of(
            self.spec, {"temperature": gen_cfg.temperature, "top_p": gen_cfg.top_p} if sampled else {}
        )
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids), 0)
        self._attention = self.model.config._attn_implementation
        self._switch_attention = (
            self.device.type == "cpu"
            and self._attention == "sdpa"
            and "attn_implementation" not in self.spec.engine_args
        )
        for name, path in self.spec.adapters.items():
            self._apply_adapter("add", name, path)
        # Warm up the kernels so the first user request is not the slow one.
        batch, logits = KVBatch.prefill(
            self.model, [[self.pad_id] * 4], self.pad_id, **self._forward_args([None])
        )
        batch.decode(self.model, logits.argmax(-1), **self._forward_args([None]))

    # -- adapters ---------------------------------------------------------------------

    async def add_adapter(self, name: str, path: Path) -> None:
        if not (Path(path) / "adapter_config.json").is_file():
            raise errors.InvalidRequest(f"no adapter_config.json in {path}", param="adapter_path")
        await self.on_engine_thread(lambda: self._apply_adapter("add", name, Path(path)))

    async def remove_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise errors.ModelNotFound(f"adapter {name!r} is not loaded", param="model")
        await self.on_engine_thread(lambda: self._apply_adapter("remove", name, None))

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def _apply_adapter(self, op: str, name: str, path: Path | None) -> None:
        """Runs on the scheduler thread."""
        from peft import PeftModel

        if op == "add":
            assert path is not None
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                    self.model.eval()
            except Exception as exc:
                raise errors.NotLoadable(f"cannot load adapter {name!r} from {path}: {exc}") from exc
            self._adapters[name] = path
        else:
            if any(s.adapter == name for s in self._running + self._waiting):
                raise errors.InvalidRequest(f"adapter {name!r} is serving requests; retry when idle")
            if len(self._adapters) == 1:
                # The last one: PEFT would keep it as the active adapter of a model that
                # has none left (every later request a KeyError); the base comes back
                # unwrapped instead, and the next adapter wraps it again.
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self._adapters[name]

    def vocab_size(self) -> int | None:
        """The ids this model takes: the tokenizer may count more than the embedding has
        rows (an id in the gap would crash a CUDA kernel), or fewer (padding rows)."""
        rows = (
            self.model.get_input_embeddings().num_embeddings
            if getattr(self, "model", None) is not None
            else None
        )
        size = len(self.tokenizer)
        return min(size, rows) if rows else size

    # -- a prompt scored (echo with logprobs, prompt_logprobs) ------------------------------

    async def score_prompt(self, plan: Plan) -> tuple[TokenLogprob, ...]:
        ids, top, adapter = list(plan.prompt), plan.sampling.prompt_logprobs or 0, plan.request.adapter
        return await self.on_engine_thread(lambda: self._score(ids, top, adapter))

    def _score(self, ids: list[int], top: int, adapter: str | None) -> tuple[TokenLogprob, ...]:
        """One forward pass over the prompt on the engine thread (the model is its own),
        with the request's adapter; each position's logits score the next token, in
        float32 a block of rows at a time, as the generated tokens' are (before
        temperature)."""
        texts: dict[int, str] = {}

        def text(i: int) -> str:
            if i not in texts:
                texts[i] = self.tokenizer.decode([i])
            return texts[i]

        self._pick_attention(1, len(ids))
        out = [TokenLogprob(ids[0], 0.0, text(ids[0]))]
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            logits = self.model(input_ids=x, use_cache=False, **self._forward_args([adapter])).logits[0, :-1]
            nxt = torch.tensor(ids[1:], device=self.device)
            for start in range(0, len(ids) - 1, _SCORE_ROWS):
                rows = torch.log_softmax(logits[start : start + _SCORE_ROWS].float(), dim=-1)
                picked = rows.gather(1, nxt[start : start + _SCORE_ROWS, None])
                ranks = ((rows > picked).sum(-1) + 1).tolist()
                chosen = picked[:, 0].tolist()
                best = rows.topk(top) if top else None
                for r, value in enumerate(chosen):
                    alternatives = (
                        tuple(
                            (i, v, text(i))
                            for v, i in zip(best.values[r].tolist(), best.indices[r].tolist())
                            if math.isfinite(v)
                        )
                        if best is not None
                        else ()
                    )
                    token = ids[start + r + 1]
                    logprob = value if math.isfinite(value) else -9999.0
                    out.append(TokenLogprob(token, logprob, text(token), alternatives, int(ranks[r])))
        return tuple(out)

    # -- embeddings ---------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        ids = checked_ids(
            lambda t: self.tokenizer(t)["input_ids"],
            texts,
            self.context_length,
            self.model.config.hidden_size,
            dimensions,
        )
        vectors = await self.on_engine_thread(lambda: self._embed(ids, dimensions))
        return vectors, sum(len(row) for row in ids)

    def _embed(self, ids: list[list[int]], dimensions: int) -> list[list[float]]:
        """On the engine thread (the model is its own), from the base weights."""
        self._pick_attention(len(ids), max(map(len, ids), default=0))  # long texts: fused
        with base_backbone(self.model) as backbone:
            return pooled(backbone, ids, self.pad_id, self.device, dimensions, _PREFILL_TOKEN_BUDGET)

    async def on_engine_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the scheduler thread between steps (the load, adapters,
        embeddings, a benchmark's ``generate`` baseline: the model is that thread's), its
        result or exception handed back here."""
        assert self._loop is not None
        done: asyncio.Future[T] = self._loop.create_future()
        self._calls.put((fn, done))
        self._wake.set()
        return await done

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_resolve, done, result, error)

    def _forward_args(self, adapters: list[str | None]) -> dict[str, Any]:
        """PEFT's per-row adapter selection, once the model carries adapters."""
        if not self._adapters:
            return {}
        return {"adapter_names": [a or "__base__" for a in adapters]}

    async def close(self) -> None:
        self.close_grammars()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    # -- requests ---------------------------------------------------------------------

    def end_ids(self) -> set[int]:
        return self.eos_ids

    def make_grammars(self) -> Grammars:
        return Grammars.for_tokenizer(self.tokenizer, self.model.config.vocab_size, self.eos_ids)

    def down(self) -> str:
        alive = self._thread is not None and self._thread.is_alive()
        return "" if alive else "the engine thread is not running"

    async def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        seq = _Sequence(
            prompt_ids=plan.prompt_ids,
            sampling=plan.sampling,
            out=asyncio.Queue(),
            stopper=Stopper(self.primed_decoder(plan), self.eos_ids, plan.sampling.stop, plan.max_new),
            generator=make_generator(plan.sampling, self.device),
            adapter=plan.adapter,
            matcher=self.matcher(plan),
            rules=self.rules(plan),
        )
        self._inbox.put(seq)
        self._wake.set()
        finished = False
        try:
            while not finished:
                step = await seq.out.get()
                if isinstance(step, BaseException):
                    raise step
                finished = step.finish_reason is not None
                yield step
        finally:
            if not finished:
                with self._lock:
                    self._aborts.add(seq)
                self._wake.set()

    def health(self) -> EngineHealth:
        """The batch as the scheduler thread sees it: in the batch, and still to prefill."""
        down = self.down()
        return EngineHealth(
            healthy=not down,
            running=len(self._running),
            waiting=len(self._waiting) + self._inbox.qsize(),
            tokens_generated=self.tracker.tokens_generated,
            detail=down,
        )

    # -- the scheduler thread ---------------------------------------------------------

    def _run(self) -> None:
        batch: KVBatch | None = None
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    batch = self._iteration(batch)
                except Exception as exc:  # keep serving: fail only the affected requests
                    log.exception("engine step failed; failing %d requests", len(self._running))
                    err = errors.EngineError(f"generation failed: {exc}")
                    # Those being prefilled are in neither list yet: fail them too.
                    failed = self._admitting + self._running + self._waiting
                    for seq in failed:
                        seq.events.append(err)
                    self._deliver(failed)
                    self._running, self._waiting, self._admitting, batch = [], [], [], None
        for seq in self._running + self._waiting:
            seq.events.append(errors.Unavailable("engine is shutting down"))
        self._deliver(self._running + self._waiting)

    def _iteration(self, batch: KVBatch | None) -> KVBatch | None:
        # 1. take new work and drop aborted requests
        self._run_calls()
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            aborts, self._aborts = self._aborts, set()
        if aborts:  # their callers are gone: drop them, nobody reads their events
            self._waiting = [s for s in self._waiting if s not in aborts]
            for seq in self._running:
                seq.done = seq.done or seq in aborts
            batch = self._compact(batch)
        if not self._running and not self._waiting:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            return batch
        # 2. admit waiting requests: prefill them together, merge into the batch
        admitted = self._admitting = self._admit()
        if admitted:
            self._pick_attention(len(admitted), max(len(s.prompt_ids) for s in admitted))
            new, logits = KVBatch.prefill(
                self.model,
                [s.prompt_ids for s in admitted],
                self.pad_id,
                **self._forward_args([s.adapter for s in admitted]),
            )
            self._advance(admitted, *self._sample(logits, admitted))
            batch = new if batch is None else batch.merge(new)
            self._running.extend(admitted)
            self._admitting = []
            batch = self._compact(batch)
            self._deliver(admitted)
            if batch is None:
                return None
            # Sequences that just got their first token decode with everyone else below.
        # 3. one decode step for the whole batch
        tokens = torch.tensor([s.last_token for s in self._running], device=self.device)
        self._pick_attention(len(self._running), 1)
        assert batch is not None  # rows are running: they are in the batch
        logits = batch.decode(self.model, tokens, **self._forward_args([s.adapter for s in self._running]))
        stepped = self._running
        self._advance(stepped, *self._sample(logits, stepped))
        batch = self._compact(batch)
        self._deliver(stepped)  # after compacting: a finished stream is no longer counted
        return batch

    def _pick_attention(self, rows: int, width: int) -> None:
        """On a CPU, transformers' eager attention (matmuls and a softmax) for a padded
        batch of ``rows`` sequences feeding ``width`` tokens each, PyTorch's fused kernel
        for one row and for prompts too long for eager (``eager_fits``).  The fused
        kernel with a padding mask was the slow part of a batched step: measured on 2
        cores with the default model in bfloat16, a decode step of 32 rows took 89-97 ms
        with it and 51-55 ms eager, of 8 rows 33-35 and 26-30 ms; of one row (no mask)
        20-21 ms fused and 25 ms eager.  Accelerators keep their fused kernels; a model
        given its own ``attn_implementation`` keeps it."""
        if not self._switch_attention:
            return
        eager = rows > 1 and eager_fits(rows, width, self.model.config.num_attention_heads)
        want = "eager" if eager else "sdpa"
        if want != self._attention:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            base.set_attn_implementation(want)
            self._attention = want

    def _sample(
        self, logits: torch.Tensor, seqs: list[_Sequence]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's rules, then its grammar (which has the last word), then sampling;
        the chosen tokens' logprobs where asked."""
        logits = process_rows(logits, [s.rules for s in seqs])
        logits = process_rows(logits, [s.matcher for s in seqs])
        tokens = sample(logits, [s.sampling for s in seqs], [s.generator for s in seqs])
        decode = lambda i: self.tokenizer.decode([i])  # noqa: E731
        return tokens, [
            None
            if s.sampling.logprobs is None
            else token_logprob(logits[row], tokens[row], s.sampling.logprobs, decode)
            for row, s in enumerate(seqs)
        ]

    def _admit(self) -> list[_Sequence]:
        room = self.spec.max_batch_size - len(self._running)
        admitted: list[_Sequence] = []
        width = 0
        while self._waiting and len(admitted) < room:
            nxt = self._waiting[0]
            new_width = max(width, len(nxt.prompt_ids))
            if admitted and new_width * (len(admitted) + 1) > _PREFILL_TOKEN_BUDGET:
                break
            admitted.append(self._waiting.pop(0))
            width = new_width
        return admitted

    def _advance(self, seqs: list[_Sequence], tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """4. account each sampled token, detokenise, apply the end rule (steps are
        queued on each sequence; ``_deliver`` hands them over)."""
        for seq, token, logprob in zip(seqs, tokens, logprobs):
            seq.last_token = token
            if seq.matcher is not None:
                seq.matcher.accept(token)
            if seq.rules is not None:
                seq.rules.accept(token)
            step = seq.stopper.push(token, logprob)
            if step is not None:
                seq.events.append(step)
                seq.done = step.finish_reason is not None

    def _compact(self, batch: KVBatch | None) -> KVBatch | None:
        """Drop finished rows from the running list and the KV batch."""
        if not any(s.done for s in self._running):
            return batch
        keep = [i for i, s in enumerate(self._running) if not s.done]
        self._running = [self._running[i] for i in keep]
        if not keep or batch is None:
            return None
        return batch.keep(keep)

    def _deliver(self, seqs: list[_Sequence]) -> None:
        items = [(s.out, s.events) for s in seqs if s.events]
        for s in seqs:
            s.events = []
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_put_all, items)


def _resolve(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue[Any], list[Any]]]) -> None:
    for q, events in items:
        for event in events:
            q.put_nowait(event)


def _apply_peft(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A model with the PEFT adapter at ``path`` applied to every request: merged into
    the weights where PEFT can (then it runs as fast as the base), else kept wrapped
    (adaption prompts)."""
    from peft import PeftModel, PeftType

    try:
        wrapped = PeftModel.from_pretrained(model, str(path))
    except Exception as exc:
        raise errors.NotLoadable(f"cannot apply the PEFT adapter in {path}: {exc}") from exc
    config = wrapped.peft_config["default"]
    if config.is_prompt_learning or config.peft_type == PeftType.ADAPTION_PROMPT:
        return wrapped
    return wrapped.merge_and_unload()
