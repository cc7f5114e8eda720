"""On a CPU the transformers engine decodes a padded batch with transformers' eager
attention (faster there: see ``TransformersEngine._pick_attention``) and runs every
prefill and a lone row with PyTorch's fused kernel (eager attention's memory grows with
a prompt's length squared), unless the model was given its own ``attn_implementation``.  That batched output equals the output alone is the engine
contract's check (tests/engines/test_contract.py, float32)."""

from __future__ import annotations

import asyncio

import pytest

from cyllm.worker.engines.transformers_engine import TransformersEngine
from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams
from tests.engines.conftest import default_folder, spec

pytestmark = pytest.mark.asyncio


class Recording(TransformersEngine):
    """Records (rows, new tokens per row, attention implementation) of every forward."""

    steps: list[tuple[int, int, str]]

    def load_weights(self, dtype):
        model = super().load_weights(dtype)
        forward, self.steps = model.forward, []

        def recorded(*args, **kwargs):
            rows, width = kwargs["input_ids"].shape
            self.steps.append((rows, width, model.config._attn_implementation))
            return forward(*args, **kwargs)

        model.forward = recorded
        return model


async def generate(engine, rid: str, prompt: str) -> None:
    events = [e async for e in engine.generate(GenerationRequest(
        rid, prompt=prompt, sampling=SamplingParams(max_tokens=6, temperature=0.0)))]
    assert isinstance(events[-1], Finished)


async def served(engine_args: dict) -> list[tuple[int, int, str]]:
    engine = Recording(spec(path=default_folder(), dtype="float32", engine_args=engine_args),
                       default_folder())
    await engine.load()
    try:
        engine.steps.clear()  # the warm-up
        await generate(engine, "alone", "The capital of France is")
        await asyncio.gather(*(generate(engine, f"b{i}", p) for i, p in
                               enumerate(["1, 2, 3,", "Once upon a time", "The best way to"])))
    finally:
        await engine.close()
    return engine.steps


async def test_a_batch_decodes_eager_and_prefills_and_lone_rows_are_fused():
    steps = await served({})
    assert {impl for rows, width, impl in steps if rows > 1 and width == 1} == {"eager"}
    assert {impl for rows, width, impl in steps if width > 1} == {"sdpa"}  # prefills
    assert {impl for rows, width, impl in steps if rows == 1} == {"sdpa"}


async def test_a_model_given_its_attention_keeps_it():
    steps = await served({"attn_implementation": "sdpa"})
    assert any(rows > 1 and width == 1 for rows, width, _ in steps)
    assert {impl for _, _, impl in steps} == {"sdpa"}
