"""Fake of ``tensorrt_llm``'s LLM API (the surface TrtLlmEngine uses): ``LLM(model=...,
**kwargs)``, ``LLM.generate_async(inputs, sampling_params, lora_request, streaming)``
returning an async-iterable result with ``abort()``, ``RequestOutput.outputs[0]`` with
``text_diff`` / ``token_ids_diff`` / ``finish_reason``, ``SamplingParams`` (keyword-only,
TensorRT-LLM's field names), ``LLM.shutdown()``.  The "model" is ``ToyModel`` over the
tokenizer of the folder given; a LoRA adapter shifts its choice of words."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from transformers import AutoTokenizer

from tests.fakes import ToyModel

# LlmArgs fields the fake accepts (a subset of the real ones); others raise like pydantic.
_ARGS = {
    "tokenizer",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_batch_size",
    "max_seq_len",
    "max_num_tokens",
    "dtype",
    "kv_cache_config",
    "enable_lora",
    "lora_config",
}

TOKEN_DELAY_S = 0.005
fail_next = False  # tests set this: the next generation fails inside the "executor"


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    include_stop_str_in_output: bool = False


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _last_text: int = 0
    _last_ids: int = 0

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_ids :]


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False


class _Result:
    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, lora, model: ToyModel) -> None:
        self.out = RequestOutput(rid, prompt, [CompletionOutput(0)])
        self.params, self.lora, self.model = params, lora, model
        self._aborted = False

    @property
    def finished(self) -> bool:
        return self.out.finished

    def abort(self) -> None:
        self._aborted = True

    def __aiter__(self):
        return self._run()

    async def _run(self):
        global fail_next
        c, p = self.out.outputs[0], self.params
        stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
        salt = self.lora.lora_int_id if self.lora is not None else 0
        context = list(self.out.prompt_token_ids)
        for i in range(p.max_tokens):
            await asyncio.sleep(TOKEN_DELAY_S)
            if fail_next:
                fail_next = False
                raise RuntimeError("executor worker died")
            c._last_text, c._last_ids = len(c.text), len(c.token_ids)
            if self._aborted:
                c.finish_reason, self.out.finished = "cancelled", True
                yield self.out
                return
            token = self.model.next(context, salt)
            context.append(token)
            c.token_ids.append(token)
            c.text = self.model.text(c.token_ids)
            hit = [c.text.find(s) for s in stops if s in c.text]
            if hit:
                c.text = c.text[: min(hit)]
                c.finish_reason, self.out.finished = "stop", True
            elif i + 1 == p.max_tokens:
                c.finish_reason, self.out.finished = "length", True
            yield self.out
            if self.out.finished:
                return


class LLM:
    def __init__(self, model: str, **kwargs) -> None:
        unknown = set(kwargs) - _ARGS
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)}")
        self.model, self.args = model, kwargs
        self.toy = ToyModel(AutoTokenizer.from_pretrained(model))
        self._next = 0
        self.closed = False

    def generate_async(self, inputs, sampling_params=None, lora_request=None, streaming=False):
        assert streaming, "the adapter streams"
        assert isinstance(inputs, list) and all(isinstance(t, int) for t in inputs)
        self._next += 1
        return _Result(self._next, inputs, sampling_params or SamplingParams(), lora_request, self.toy)

    def shutdown(self) -> None:
        self.closed = True
