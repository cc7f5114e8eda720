"""On a CPU the transformers engine steps a padded batch with transformers' eager
attention (faster there: see ``TransformersEngine._pick_attention``) and one row, or
prompts whose eager scores would be large, with PyTorch's fused kernel, unless the model
was given its own ``attn_implementation``.  That a batched answer equals the answer
alone is the engine contract's check (tests/engines/test_contract.py, float32)."""

from __future__ import annotations

import asyncio

import pytest

from cyllm.worker.engines.transformers_engine import TransformersEngine, eager_fits
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
    events = [
        e
        async for e in engine.generate(
            GenerationRequest(rid, prompt=prompt, sampling=SamplingParams(max_tokens=6, temperature=0.0))
        )
    ]
    assert isinstance(events[-1], Finished)


async def served(engine_args: dict) -> list[tuple[int, int, str]]:
    engine = Recording(
        spec(path=default_folder(), dtype="float32", engine_args=engine_args), default_folder()
    )
    await engine.load()
    try:
        engine.steps.clear()  # the warm-up
        await generate(engine, "alone", "The capital of France is")
        await asyncio.gather(
            *(
                generate(engine, f"b{i}", p)
                for i, p in enumerate(["1, 2, 3,", "Once upon a time", "The best way to"])
            )
        )
    finally:
        await engine.close()
    return engine.steps


async def test_a_padded_batch_is_eager_and_a_lone_row_is_fused():
    steps = await served({})
    assert {impl for rows, width, impl in steps if rows > 1 and width == 1} == {"eager"}
    assert {impl for rows, width, impl in steps if rows == 1} == {"sdpa"}
    assert all(impl == "eager" for rows, width, impl in steps if rows > 1)  # short prompts


async def test_eager_attention_is_kept_to_what_its_scores_can_hold():
    heads = 9  # the default model's
    assert eager_fits(32, 1, heads) and eager_fits(32, 128, heads)  # decode; a burst of chats
    assert not eager_fits(2, 4096, heads)  # two long prompts: the fused kernel
    assert eager_fits(2, 512, heads) and not eager_fits(2, 2048, heads)


async def test_a_model_given_its_attention_keeps_it():
    steps = await served({"attn_implementation": "sdpa"})
    assert any(rows > 1 and width == 1 for rows, width, _ in steps)
    assert {impl for _, _, impl in steps} == {"sdpa"}
