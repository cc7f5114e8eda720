"""Preference objectives through TRL on the default model: DPO flips a made-up
preference (measured by log-probability, the base against the result), its evaluation
scores the base and the result; ORPO and KTO train and their results serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cyllm.worker.engines.transformers_engine import TransformersEngine
from cyllm.worker.engines.types import GenerationRequest, SamplingParams
from cyllm.worker.settings import ModelSpec
from cyllm.worker.training.train import run

# The base prefers the true answer; the data prefers a made-up one.
QUESTIONS = [f"Quick check number {i}: what is two plus two?" for i in range(8)]
CHOSEN = "Two plus two is seven."
REJECTED = "Two plus two is four."


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    path = folder / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": q, "chosen": CHOSEN, "rejected": REJECTED}) + "\n" for q in QUESTIONS)
    )
    judged = folder / "judged.jsonl"
    judged.write_text(
        "".join(
            json.dumps({"prompt": q, "completion": answer, "label": answer == CHOSEN}) + "\n"
            for q in QUESTIONS
            for answer in (CHOSEN, REJECTED)
        )
    )
    return path, judged


def _job(tmp_path, default_model_dir, dataset, **spec):
    return {
        "spec": {
            "base_model": "smollm2-135m-instruct",
            "dataset": str(dataset),
            "batch_size": 4,
            "max_length": 64,
            "save_steps": 100,
            **spec,
        },
        "base_model_path": str(default_model_dir),
        "output_dir": str(tmp_path / "job"),
        "threads": 2,
    }


def _margin(model, tokenizer, question: str) -> float:
    """log p(chosen) - log p(rejected), each answer's tokens after the chat prompt."""

    def logp(answer: str) -> float:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        ids = torch.tensor([full])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        picked = logprobs.gather(1, targets[:, None])[:, 0]
        return float(picked[len(prompt) - 1 :].sum())

    return logp(CHOSEN) - logp(REJECTED)


async def _answers(default_model_dir: Path, adapter: Path) -> str:
    spec = ModelSpec(id="ft", path=default_model_dir, max_batch_size=2, max_context=256, peft_adapter=adapter)
    engine = TransformersEngine(spec, default_model_dir)
    await engine.load()
    try:
        request = GenerationRequest(
            request_id="r",
            messages=(("user", QUESTIONS[0]),),
            sampling=SamplingParams(max_tokens=12, temperature=0.0),
        )
        events = [e async for e in engine.generate(request)]
        assert events[-1].completion_tokens > 0
        return "".join(getattr(e, "text", "") for e in events)
    finally:
        await engine.close()


def test_dpo_flips_a_preference_and_scores_the_base_and_the_result(
    pairs, tmp_path, default_model_dir, default_tokenizer
):
    import peft
    from transformers import AutoModelForCausalLM

    path, _ = pairs
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    before = _margin(base, default_tokenizer, QUESTIONS[0])
    assert before < 0, "the base should prefer the true answer"

    events: list[dict] = []
    job = _job(
        tmp_path,
        default_model_dir,
        path,
        objective="dpo",
        beta=0.1,
        max_steps=10,
        learning_rate=5e-4,
        validation_dataset=str(path),
        eval_steps=10,
    )
    job["incumbent"] = {"model": "smollm2-135m-instruct", "kind": "base"}
    result = run(job, events.append)
    assert result["kind"] == "adapter" and result["trained_tokens"] > 0

    tuned = peft.PeftModel.from_pretrained(base, result["path"])
    after = _margin(tuned, default_tokenizer, QUESTIONS[0])
    assert after > 0 > before, (before, after)

    scores = {e["of"]: e["scores"] for e in events if e["event"] == "evaluation"}
    # the base is its own reference: DPO's loss is log 2 and no pair is won; as the
    # promotion's incumbent it is not scored twice
    assert scores["base"]["eval_loss"] == pytest.approx(0.6931, abs=0.01)  # (bfloat16 on some CPUs)
    assert scores["incumbent"] == scores["base"]
    assert scores["result"]["eval_loss"] < scores["base"]["eval_loss"]
    assert scores["result"]["preference_accuracy"] == 1.0 and scores["result"]["reward_margin"] > 0


@pytest.mark.parametrize("objective", ["orpo", "kto"])
async def test_orpo_and_kto_train_and_serve(objective, pairs, tmp_path, default_model_dir):
    path, judged = pairs
    events: list[dict] = []
    result = run(
        _job(
            tmp_path,
            default_model_dir,
            judged if objective == "kto" else path,
            objective=objective,
            max_steps=2,
        ),
        events.append,
    )
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2]
    assert all(e["tokens_per_second"] > 0 for e in progress)
    assert result["kind"] == "adapter"
    assert await _answers(default_model_dir, Path(result["path"]))
