"""Packing and precision on the default model: packed examples give the same loss as the
same examples padded (none attends to another), a packed job takes fewer steps for the
same examples, and the precision follows the device (bfloat16 where the CPU has it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cyllm import errors
from cyllm.training.data import load_examples, tokenize
from cyllm.worker.devices import cpu_has_bfloat16
from cyllm.worker.training.train import _pack, _Unpacking, run

DATA = Path(__file__).parents[1] / "data" / "facts.jsonl"


def test_packed_examples_give_the_loss_of_the_same_examples_padded(default_model_dir, default_tokenizer):
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    rows = [
        {"input_ids": t.input_ids, "labels": t.labels}
        for t in (tokenize(e, default_tokenizer, 512) for e in load_examples(DATA))
        if t is not None
    ]
    packed = _pack(rows, 256)
    assert len(packed) < len(rows) and sum(len(r["seq_lengths"]) for r in packed) == len(rows)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    padded = DataCollatorForSeq2Seq(default_tokenizer, padding=True, label_pad_token_id=-100)(rows)
    flat = _Unpacking()(packed)
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1  # one row, no padding
    model.train()  # as in a job (the model has no dropout)
    with torch.no_grad():
        apart = model(**padded).loss
        together = model(**flat).loss
    assert together == pytest.approx(float(apart), rel=1e-4)
    # without the restarted positions the examples would see each other: a different loss
    with torch.no_grad():
        leaking = model(**{**flat, "use_cache": True}).loss
    assert abs(float(leaking) - float(apart)) > 1e-3


def _job(tmp_path, default_model_dir, **spec):
    return {
        "spec": {
            "base_model": "smollm2-135m-instruct",
            "dataset": str(DATA),
            "epochs": 1,
            "batch_size": 2,
            "max_length": 256,
            "save_steps": 1000,
            "options": {"lora_dropout": 0.0},
            **spec,
        },
        "base_model_path": str(default_model_dir),
        "output_dir": str(tmp_path / "job"),
        "threads": 2,
    }


def test_a_packed_job_takes_fewer_steps_for_the_same_examples(tmp_path, default_model_dir):
    runs = {}
    for packing in (False, True):
        events: list[dict] = []
        run(
            _job(tmp_path / str(packing), default_model_dir, packing=packing, precision="float32"),
            events.append,
        )
        runs[packing] = events
    steps = {k: [e for e in v if e["event"] == "progress"] for k, v in runs.items()}
    assert len(steps[True]) < len(steps[False]), {k: len(v) for k, v in steps.items()}
    assert any(m.get("message", "").startswith("packed 8 examples into") for m in runs[True])
    # every example trained on, no padding counted: the same real tokens either way
    assert steps[True][-1]["tokens"] == steps[False][-1]["tokens"] > 0
    assert any(m.get("message") == "float32" for m in runs[True])


def test_precision_follows_the_device(tmp_path, default_model_dir):
    events: list[dict] = []
    run(_job(tmp_path, default_model_dir, max_steps=1), events.append)
    said = "bfloat16 mixed precision" if cpu_has_bfloat16() else "float32"
    assert any(e.get("message") == said for e in events), [e.get("message") for e in events]
    with pytest.raises(errors.InvalidRequest, match="packing: 'llama' models with method 'adaliprompt'"):
        run(_job(tmp_path, default_model_dir, method="adaliprompt", packing=True), events.append)
