"""Training throughput on the default model (SmolLM2-135M-Instruct, on the CPU):
tokens/s of the built-in trainer (LoRA and full fine-tuning; padded float32, and packed
with the precision the device picks — bfloat16 where the CPU has it), against what a
user would run by hand in the same process: TRL's ``SFTTrainer`` on the same model,
data and hyper-parameters (completion-only loss, the same packing and precision), and a
bare PyTorch loop (same LoRA model, same batches, AdamW, no Trainer, no callbacks, no
checkpoints).  The ratios are the price of the job machinery, and what packing and
precision buy.

Data: the made-up facts of the tests repeated 64 times (``tests/data/facts.jsonl``); tokens are
the real (unpadded) tokens of each batch.  Each row runs the same number of optimizer
steps after one warm-up step.

    python bench/training.py [--steps 20] [--batch-size 8] [--dpo | --dpo-only]

``--dpo`` adds a preference job (DPO, LoRA, float32) against TRL's ``DPOTrainer`` run by
hand on the same pairs (each fact's answer preferred to a refusal), as pairs per second.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MODEL, print_table

FACTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "facts.jsonl"
REPEATS = 64  # the eight facts, 512 examples: enough rows for packed batches too
DATA = Path(tempfile.mkdtemp(prefix="cyllm-bench-")) / "facts.jsonl"
DATA.write_text(FACTS.read_text() * REPEATS)


PAIRS = DATA.parent / "pairs.jsonl"  # each fact's answer preferred to a refusal


def _pairs() -> None:
    import json

    lines = [json.loads(line)["messages"] for line in FACTS.read_text().splitlines() if line.strip()]
    PAIRS.write_text(
        "".join(
            json.dumps({"prompt": m[0]["content"], "chosen": m[1]["content"], "rejected": "I am not sure."})
            + "\n"
            for m in lines
        )
        * REPEATS
    )


_pairs()


def folder() -> Path:
    from cyllm.worker import model_files
    from cyllm.worker.settings import WorkerSettings, default_models

    return model_files.resolve(default_models()[0], WorkerSettings().cache_dir)


def ours(
    method: str,
    steps: int,
    batch: int,
    packing: bool = False,
    precision: str = "float32",
    objective: str = "sft",
) -> float:
    """Tokens/s of our trainer between its first and last step (warm-up excluded); for a
    preference objective, pairs/s."""
    from cyllm.worker.training.train import run

    seen: list[tuple[float, int]] = []  # (when, tokens trained so far) at each step's end

    def emit(event: dict) -> None:
        if event["event"] == "progress":
            seen.append(
                (time.perf_counter(), event["tokens"] if objective == "sft" else event["step"] * batch)
            )

    with tempfile.TemporaryDirectory() as out:
        run(
            {
                "spec": {
                    "base_model": MODEL,
                    "dataset": str(DATA if objective == "sft" else PAIRS),
                    "objective": objective,
                    "method": method,
                    "max_steps": steps + 1,
                    "batch_size": batch,
                    "save_steps": 10_000,
                    **({"packing": packing} if objective == "sft" else {}),
                    "precision": precision,
                    "learning_rate": 2e-4,
                },
                "base_model_path": str(folder()),
                "output_dir": out,
            },
            emit,
        )
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    return (n1 - n0) / (t1 - t0)


def trl_by_hand(steps: int, batch: int, packing: bool, bf16: bool) -> float:
    """Tokens/s of TRL's SFTTrainer as a user would write it: the same LoRA config,
    examples (prompt and completion: the loss on the answer only) and settings."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from cyllm.training import methods
    from cyllm.training.data import load_examples

    rows = [{"prompt": e.as_messages()[:-1], "completion": e.as_messages()[-1:]} for e in load_examples(DATA)]
    seen: list[tuple[float, int]] = []

    class Tokens(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                seen.append((time.perf_counter(), int(logs["num_tokens"])))

    tok = AutoTokenizer.from_pretrained(folder())
    model = AutoModelForCausalLM.from_pretrained(folder(), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(
                output_dir=out,
                per_device_train_batch_size=batch,
                max_steps=steps + 1,
                learning_rate=2e-4,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                bf16=bf16,
                packing=packing,
                max_length=512,
                disable_tqdm=True,
            ),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            peft_config=methods.peft_config("lora", {}, model.config.model_type, steps + 1),
            callbacks=[Tokens()],
        )
        trainer.train()
    (t0, n0), (t1, n1) = seen[0], seen[-1]
    return (n1 - n0) / (t1 - t0)


def trl_dpo_by_hand(steps: int, batch: int, bf16: bool) -> float:
    """Pairs/s of TRL's DPOTrainer as a user would write it: the same LoRA config, pairs,
    beta, settings and precision (TRL's configs default to bfloat16: it is set either
    way); the reference is the base with the adapter off, as in the job."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from cyllm.training import methods
    from cyllm.training.data import Reading, load_preferences

    rows = [r.as_row() for r in load_preferences(PAIRS, Reading(), "dpo")]
    seen: list[tuple[float, int]] = []

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((time.perf_counter(), state.global_step * batch))

    tok = AutoTokenizer.from_pretrained(folder())
    model = AutoModelForCausalLM.from_pretrained(folder(), dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.DPOTrainer(
            model=model,
            args=trl.DPOConfig(
                output_dir=out,
                per_device_train_batch_size=batch,
                max_steps=steps + 1,
                learning_rate=2e-4,
                beta=0.1,
                max_length=512,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                bf16=bf16,
                disable_tqdm=True,
            ),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tok,
            peft_config=methods.peft_config("lora", {}, model.config.model_type, steps + 1),
            callbacks=[Steps()],
        )
        trainer.train()
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
    parser.add_argument("--dpo", action="store_true", help="also DPO: the job against TRL's DPOTrainer")
    parser.add_argument("--dpo-only", action="store_true", help="only the DPO comparison")
    args = parser.parse_args()
    import torch

    from cyllm.worker.devices import cpu_has_bfloat16

    torch.manual_seed(0)
    bf16 = cpu_has_bfloat16()
    picked = "bfloat16" if bf16 else "float32"
    steps, batch = args.steps, args.batch_size
    if args.dpo_only:
        dpo_rows(steps, batch, bf16)
        return
    padded = ours("lora", steps, batch)
    # a packed row holds max_length (512) tokens, about what a padded batch of eight of these
    # examples holds: one row per step keeps the tokens per step alike
    rows = [
        ["cyllm job, LoRA, padded float32", padded, "1.00"],
        [f"cyllm job, LoRA, packed {picked} (the default)", ours("lora", steps, 1, True, "auto"), ""],
        ["TRL SFTTrainer by hand, LoRA, padded float32", trl_by_hand(steps, batch, False, False), ""],
        [f"TRL SFTTrainer by hand, LoRA, packed {picked}", trl_by_hand(steps, 1, True, bf16), ""],
        ["bare PyTorch loop, LoRA, padded float32", bare_loop(steps, batch), ""],
        ["cyllm job, full, padded float32", ours("full", steps, batch), ""],
    ]
    for r in rows[1:]:
        r[2] = f"{r[1] / padded:.2f}"
    print_table(
        f"training tokens/s, {MODEL}, CPU, batch {batch}, {steps} steps (one process, same minute)",
        ["run", "tokens/s", "vs the padded float32 job"],
        [[name, f"{rate:.0f}", ratio] for name, rate, ratio in rows],
    )
    if args.dpo:
        dpo_rows(steps, batch, bf16)


def dpo_rows(steps: int, batch: int, bf16: bool) -> None:
    """The DPO job against TRL's DPOTrainer by hand, in each precision the CPU has, each
    pair run in both orders (neither side always first)."""
    rows = []
    for precision in ["float32"] + (["bfloat16"] if bf16 else []):
        half = precision == "bfloat16"
        a = ours("lora", steps, batch, precision=precision, objective="dpo")
        b = trl_dpo_by_hand(steps, batch, half)
        b2 = trl_dpo_by_hand(steps, batch, half)
        a2 = ours("lora", steps, batch, precision=precision, objective="dpo")
        for n, (mine, theirs) in enumerate([(a, b), (a2, b2)]):
            order = "job first" if n == 0 else "TRL first"
            rows.append(
                [f"DPO, LoRA, {precision} ({order})", f"{mine:.2f}", f"{theirs:.2f}", f"{mine / theirs:.2f}"]
            )
    print_table(
        f"DPO pairs/s, {MODEL}, CPU, batch {batch}, {steps} steps (same minutes)",
        ["run", "cyllm job", "TRL DPOTrainer by hand", "ratio"],
        rows,
    )


if __name__ == "__main__":
    main()
