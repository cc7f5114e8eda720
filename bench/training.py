"""Training throughput on the default model (SmolLM2-135M-Instruct, CPU float32):
tokens/s of the built-in trainer for LoRA and for full fine-tuning, against a bare
PyTorch loop (same LoRA model, same batches, AdamW, no Trainer, no callbacks, no
checkpoints) run in the same process — the ratio is the price of the job machinery.

Data: the made-up facts of the tests repeated (``tests/data/facts.jsonl``); tokens are
the real (unpadded) tokens of each batch.  Each row runs the same number of optimizer
steps after one warm-up step.

    python bench/training.py [--steps 20] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MODEL, print_table

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "facts.jsonl"


def folder() -> Path:
    from cyllm.worker import model_files
    from cyllm.worker.settings import WorkerSettings, default_models

    return model_files.resolve(default_models()[0], WorkerSettings().cache_dir)


def ours(method: str, steps: int, batch: int) -> float:
    """Tokens/s of our trainer between its first and last step (warm-up excluded)."""
    from cyllm.worker.training.train import run

    seen: list[tuple[float, int]] = []  # (when, tokens trained so far) at each step's end

    def emit(event: dict) -> None:
        if event["event"] == "progress":
            seen.append((time.perf_counter(), event["tokens"]))

    with tempfile.TemporaryDirectory() as out:
        run(
            {
                "spec": {
                    "base_model": MODEL,
                    "dataset": str(DATA),
                    "method": method,
                    "max_steps": steps + 1,
                    "batch_size": batch,
                    "save_steps": 10_000,
                },
                "base_model_path": str(folder()),
                "output_dir": out,
            },
            emit,
        )
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    return (n1 - n0) / (t1 - t0)


def bare_loop(steps: int, batch: int) -> float:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    from cyllm.training import methods
    from cyllm.training.data import load_examples, tokenize

    tok = AutoTokenizer.from_pretrained(folder())
    rows = [tokenize(e, tok, 512) for e in load_examples(DATA)]
    feats = [{"input_ids": r.input_ids, "labels": r.labels} for r in rows]
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    model = AutoModelForCausalLM.from_pretrained(folder(), dtype=torch.float32)
    model = get_peft_model(model, methods.peft_config("lora", {}, model.config.model_type, steps))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    tokens, started = 0, 0.0
    for step in range(steps + 1):
        picked = [feats[(step * batch + i) % len(feats)] for i in range(batch)]
        if step == 1:
            tokens, started = 0, time.perf_counter()
        tokens += sum(len(f["input_ids"]) for f in picked)
        loss = model(**collate(picked)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    import torch

    torch.manual_seed(0)
    baseline = bare_loop(args.steps, args.batch_size)
    rows = [["bare PyTorch loop, LoRA", f"{baseline:.0f}", "1.00"]]
    for method in ("lora", "full"):
        rate = ours(method, args.steps, args.batch_size)
        rows.append([f"cyllm trainer, {method}", f"{rate:.0f}", f"{rate / baseline:.2f}"])
    print_table(
        f"training tokens/s, {MODEL}, CPU float32, batch {args.batch_size}, {args.steps} steps",
        ["run", "tokens/s", "vs bare loop"],
        rows,
    )


if __name__ == "__main__":
    main()
