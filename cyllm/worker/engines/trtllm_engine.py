"""TensorRT-LLM, through its Python ``LLM`` API with streaming (``generate_async``).

``tensorrt_llm.LLM(model=<HF folder or engine dir>, **engine_args)`` builds or loads the
TensorRT engine; ``engine_args`` pass through (``tensor_parallel_size``,
``pipeline_parallel_size``, ``max_num_tokens``, ``kv_cache_config``, ``lora_config``...).
We tokenise with the model's Hugging Face tokenizer and send token ids; TensorRT-LLM
streams ``RequestOutput``s whose ``outputs[0].text_diff`` / ``token_ids_diff`` are the
new text and tokens; ``RequestOutput.abort()`` cancels.  LoRA adapters named in the spec
are sent per request as ``LoRARequest`` (the LLM must be built with LoRA enabled, via
``engine_args``).

Not yet run on NVIDIA hardware (see the README's status table): tested against a
fake of the ``tensorrt_llm`` API surface used below.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from cyllm import errors
from cyllm.worker.engines.base import Engine
from cyllm.worker.engines.planning import Plan, SamplingDefaults
from cyllm.worker.engines.types import ModelCard, Step
from cyllm.worker.model_files import folder_context_length
from cyllm.worker.settings import ModelSpec


class TrtLlmEngine(Engine):
    name = "trtllm"
    library = "TensorRT-LLM"
    finish_reasons = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
    # Stop strings are cut by the skeleton, which holds back a possible partial match;
    # TensorRT-LLM's streamed ``text_diff`` is not documented to.
    checks_stop_strings = False

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        super().__init__(spec)
        self.model_dir = model_dir
        self.llm: Any = None
        self._loras: dict[str, Any] = {}

    async def load(self) -> ModelCard:
        import tensorrt_llm
        from transformers import AutoTokenizer

        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, self.model_dir)
        self.context_length = folder_context_length(self.model_dir, self.spec.max_context)
        kwargs = {
            "max_batch_size": self.spec.max_batch_size,
            "max_seq_len": self.context_length,
            **self.spec.engine_args,
        }
        try:
            self.llm = await asyncio.to_thread(tensorrt_llm.LLM, model=str(self.model_dir), **kwargs)
        except TypeError as exc:  # an engine argument the LLM API does not take
            raise errors.NotLoadable(f"model {self.spec.id!r}: bad TensorRT-LLM argument: {exc}") from exc
        except Exception as exc:
            raise errors.NotLoadable(f"TensorRT-LLM could not load {self.spec.id!r}: {exc}") from exc
        self.defaults = SamplingDefaults.of(self.spec)
        for name, path in self.spec.adapters.items():
            await self.add_adapter(name, path)
        return ModelCard(
            self.spec.id, self.context_length, self.name, self.spec.max_batch_size, "cuda", int(time.time())
        )

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

    def down(self) -> str:
        return "not loaded" if self.llm is None else ""

    async def stream(self, plan: Plan) -> AsyncGenerator[Step, None]:
        from tensorrt_llm import SamplingParams

        s = plan.sampling
        params = SamplingParams(
            max_tokens=plan.max_new, temperature=s.temperature, top_p=s.top_p, seed=s.seed
        )
        lora = self._loras.get(plan.adapter) if plan.adapter else None
        result = self.llm.generate_async(
            plan.prompt_ids, sampling_params=params, lora_request=lora, streaming=True
        )
        try:
            async for out in result:
                completion = out.outputs[0]
                yield Step(
                    completion.text_diff,
                    tuple(completion.token_ids_diff),
                    (completion.finish_reason or "") if out.finished else None,
                )
                if out.finished:
                    return
        finally:
            if not result.finished:
                result.abort()
