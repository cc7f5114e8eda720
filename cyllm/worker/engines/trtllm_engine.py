"""TensorRT-LLM, through its Python ``LLM`` API with streaming (``generate_async``).

``tensorrt_llm.LLM(model=<HF folder or engine dir>, **engine_args)`` builds or loads the
TensorRT engine; ``engine_args`` pass through (``tensor_parallel_size``,
``pipeline_parallel_size``, ``max_num_tokens``, ``kv_cache_config``, ``lora_config``...).
We tokenise with the model's Hugging Face tokenizer and send token ids; TensorRT-LLM
streams ``RequestOutput``s whose ``outputs[0].text_diff`` / ``token_ids_diff`` are the
new text and tokens; ``RequestOutput.abort()`` cancels.  LoRA adapters named in the spec
are sent per request as ``LoRARequest`` (the LLM must be built with LoRA enabled, via
``engine_args``).

Not run on hardware here (no NVIDIA GPU on the development machine): tested against a
fake of the ``tensorrt_llm`` API surface used below.
"""

from __future__ import annotations

import asyncio
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
)
from cyllm.worker.engines.prompt import plan
from cyllm.worker.engines.tracking import DeltaBuffer, RequestTracker
from cyllm.worker.settings import ModelSpec

# TensorRT-LLM's finish reasons -> ours.
_FINISH = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}


def model_context_length(model_dir: Path, cap: int | None) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir).get_text_config()
    own = getattr(config, "max_position_embeddings", None) or 2048
    return min(own, cap or own)


class TrtLlmEngine(AbstractEngine):
    name = "trtllm"

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        self.spec = spec
        self.model_dir = model_dir
        self.llm: Any = None
        self.tracker = RequestTracker()
        self._results: dict[str, Any] = {}
        self._loras: dict[str, Any] = {}
        self._dead = ""

    async def load(self) -> ModelCard:
        import tensorrt_llm
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        self.context_length = model_context_length(self.model_dir, self.spec.max_context)
        kwargs = {"max_batch_size": self.spec.max_batch_size, "max_seq_len": self.context_length,
                  **self.spec.engine_args}
        try:
            self.llm = await asyncio.to_thread(tensorrt_llm.LLM, model=str(self.model_dir), **kwargs)
        except TypeError as exc:  # an engine argument the LLM API does not take
            raise errors.NotLoadable(f"model {self.spec.id!r}: bad TensorRT-LLM argument: {exc}") from exc
        except Exception as exc:
            raise errors.NotLoadable(f"TensorRT-LLM could not load {self.spec.id!r}: {exc}") from exc
        self.temperature = self.spec.temperature if self.spec.temperature is not None else 1.0
        self.top_p = self.spec.top_p if self.spec.top_p is not None else 1.0
        for name, path in self.spec.adapters.items():
            await self.add_adapter(name, path)
        return ModelCard(self.spec.id, self.context_length, self.name, self.spec.max_batch_size,
                         "cuda", int(time.time()))

    async def close(self) -> None:
        if self.llm is not None:
            await asyncio.to_thread(self.llm.shutdown)
            self.llm = None

    async def add_adapter(self, name: str, path: Path) -> None:
        from tensorrt_llm.executor import LoRARequest

        if not (Path(path) / "adapter_config.json").is_file():
            raise errors.InvalidRequest(f"no adapter_config.json in {path}", param="adapter_path")
        self._loras[name] = LoRARequest(name, len(self._loras) + 1, str(path))

    async def remove_adapter(self, name: str) -> None:
        if self._loras.pop(name, None) is None:
            raise errors.ModelNotFound(f"adapter {name!r} is not loaded", param="model")

    def adapters(self) -> list[str]:
        return list(self._loras)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        from tensorrt_llm import SamplingParams

        if self.llm is None or self._dead:
            raise errors.EngineError(f"TensorRT-LLM engine for {self.spec.id} is down {self._dead}")
        self.check_adapter(request)
        sampling, prompt_ids, max_new = plan(
            self.tokenizer, request, temperature=self.temperature, top_p=self.top_p,
            context=self.context_length, default_max_tokens=self.spec.default_max_tokens)
        params = SamplingParams(max_tokens=max_new, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed,
                                stop=list(sampling.stop) or None)
        rid = request.request_id
        lora = self._loras.get(request.adapter) if request.adapter else None
        buffer, result = DeltaBuffer(), None
        self.tracker.start(rid)
        try:
            yield Started(len(prompt_ids))
            result = self.llm.generate_async(prompt_ids, sampling_params=params,
                                             lora_request=lora, streaming=True)
            self._results[rid] = result
            async for out in result:
                completion = out.outputs[0]
                n = len(completion.token_ids_diff)
                self.tracker.produced(n)
                delta = buffer.push(completion.text_diff, n)
                if delta is not None:
                    yield delta
                if out.finished:
                    yield Finished(_FINISH.get(completion.finish_reason or "", "stop"),
                                   len(prompt_ids), buffer.total)
                    return
        except (errors.CyllmError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:  # RequestError, executor failures
            raise errors.EngineError(f"TensorRT-LLM failed on request {rid}: {exc}") from exc
        finally:
            self.tracker.finish(rid)
            self._results.pop(rid, None)
            if result is not None and not result.finished:
                result.abort()

    async def abort(self, request_id: str) -> None:
        result = self._results.get(request_id)
        if result is not None:
            result.abort()

    def health(self) -> EngineHealth:
        return self.tracker.health(self.llm is not None and not self._dead, self._dead)
