"""Every method trains a few real steps on the default model, saves, and loads back for
inference in the transformers engine — the way the worker serves what a job trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cyllm import errors
from cyllm.worker.engines.transformers_engine import TransformersEngine
from cyllm.worker.engines.types import GenerationRequest, SamplingParams
from cyllm.worker.settings import ModelSpec
from cyllm.worker.training.train import run

DATA = Path(__file__).parents[1] / "data" / "facts.jsonl"
METHODS = [
    "lora",
    "dora",
    "pissa",
    "adalora",
    "ia3",
    "loha",
    "lokr",
    "vera",
    "fourier",
    "adaliprompt",
    "full",
]


def _job(tmp_path, default_model_dir, **spec):
    return {
        "spec": {
            "base_model": "smollm2-135m-instruct",
            "dataset": str(DATA),
            "max_steps": 2,
            "batch_size": 2,
            "max_length": 64,
            "save_steps": 1,
            **spec,
        },
        "base_model_path": str(default_model_dir),
        "output_dir": str(tmp_path / "job"),
        "threads": 2,
    }


async def _serve(spec: ModelSpec, folder: Path, prompt_ids: torch.Tensor, adapter: str | None = None):
    engine = TransformersEngine(spec, folder)
    await engine.load()
    try:
        with torch.no_grad():
            logits = engine.model(input_ids=prompt_ids).logits[0, -1] if adapter is None else None
        request = GenerationRequest(
            request_id="r",
            messages=(("user", "What is the capital of Zorblax?"),),
            sampling=SamplingParams(max_tokens=8, temperature=0.0),
            adapter=adapter,
        )
        events = [e async for e in engine.generate(request)]
        return logits, events[-1]
    finally:
        await engine.close()


@pytest.fixture(scope="module")
def base_logits(default_model_dir, default_tokenizer):
    from transformers import AutoModelForCausalLM

    ids = default_tokenizer("The capital of Zorblax is", return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    with torch.no_grad():
        return ids, model(input_ids=ids).logits[0, -1]


@pytest.mark.parametrize("method", METHODS)
async def test_method_trains_saves_and_serves(method, tmp_path, default_model_dir, base_logits):
    events: list[dict] = []
    result = run(_job(tmp_path, default_model_dir, method=method), events.append)
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2]
    assert all(e["loss"] > 0 and e["tokens_per_second"] > 0 for e in progress)
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [1, 2]
    assert result["kind"] == {"lora": "adapter", "pissa": "adapter", "full": "model"}.get(method, "peft")
    out = Path(result["path"])

    ids, before = base_logits
    spec = ModelSpec(id="ft", path=default_model_dir, max_batch_size=2, max_context=256)
    if result["kind"] == "model":
        spec = spec.model_copy(update={"path": out})
    else:
        spec = spec.model_copy(update={"peft_adapter": out})
    logits, finished = await _serve(spec, spec.path, ids)
    assert finished.completion_tokens > 0
    assert (logits - before).abs().max() > 1e-5, f"{method}: the trained model answers as the base"
    if result["kind"] == "adapter":  # also as <base>:<adapter> beside the base (mixed batches)
        shared = ModelSpec(
            id="base", path=default_model_dir, max_batch_size=2, max_context=256, adapters={"ft": out}
        )
        _, finished = await _serve(shared, default_model_dir, ids, adapter="ft")
        assert finished.completion_tokens > 0


def test_resume_continues_from_the_checkpoint(tmp_path, default_model_dir):
    first: list[dict] = []
    run(_job(tmp_path, default_model_dir, max_steps=2), first.append)
    again: list[dict] = []
    job = _job(tmp_path, default_model_dir, max_steps=3)
    job["resume_from"] = str(tmp_path / "job" / "checkpoint-2")
    run(job, again.append)
    assert [e["step"] for e in again if e["event"] == "progress"] == [3]
    assert any("resumed from step 2" in e.get("message", "") for e in again)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"quantization": "4bit"}, "needs an NVIDIA GPU with CUDA"),
        ({"options": {"rank": 4}}, "options ['rank'] are not LoraConfig fields"),
        ({"options": {"target_modules": ["no_such_layer"]}}, "does not apply to this model"),
        ({"dataset": "/nonexistent/data.jsonl"}, "does not exist on this worker"),
    ],
)
def test_unusable_jobs_are_refused_before_training(spec, message, tmp_path, default_model_dir):
    events: list[dict] = []
    with pytest.raises(errors.InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        run(_job(tmp_path, default_model_dir, **spec), events.append)
    assert not [e for e in events if e["event"] == "progress"]
