"""On a CPU the transformers engine steps a lone row with PyTorch's fused attention and
a padded batch with transformers' eager attention (faster there: see
``TransformersEngine._pick_attention``), unless the model was given its own
``attn_implementation``.  That batched output equals the output alone is the engine
contract's check (tests/engines/test_contract.py, float32)."""

from __future__ import annotations

import asyncio

import pytest

from cyllm.worker.engines.transformers_engine import TransformersEngine
from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams
from tests.engines.conftest import default_folder, spec

pytestmark = pytest.mark.asyncio


class Recording(TransformersEngine):
    """Records (rows, attention implementation) of every forward pass."""

    steps: list[tuple[int, str]]

    def load_weights(self, dtype):
        model = super().load_weights(dtype)
        forward, self.steps = model.forward, []

        def recorded(*args, **kwargs):
            self.steps.append((kwargs["input_ids"].shape[0], model.config._attn_implementation))
            return forward(*args, **kwargs)

        model.forward = recorded
        return model


async def generate(engine, rid: str, prompt: str) -> None:
    events = [e async for e in engine.generate(GenerationRequest(
        rid, prompt=prompt, sampling=SamplingParams(max_tokens=6, temperature=0.0)))]
    assert isinstance(events[-1], Finished)


async def served(engine_args: dict) -> list[tuple[int, str]]:
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


async def test_a_lone_row_is_fused_and_a_padded_batch_is_eager():
    steps = await served({})
    assert {impl for rows, impl in steps if rows == 1} == {"sdpa"}
    assert {impl for rows, impl in steps if rows > 1} == {"eager"}


async def test_a_model_given_its_attention_keeps_it():
    steps = await served({"attn_implementation": "sdpa"})
    assert any(rows > 1 for rows, _ in steps)
    assert {impl for _, impl in steps} == {"sdpa"}
