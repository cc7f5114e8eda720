"""The built-in training loop, run in a child process of the worker:

    python -m cyllm.worker.training.train JOB.json

``JOB.json`` is ``{"spec": TrainingSpec, "base_model_path", "output_dir", "resume_from",
"device", "threads", "incumbent"}``; ``incumbent`` (``{"model", "kind", "path"}``, kind
``base``, ``adapter``, ``peft`` or ``model``) is what a promotion must beat, evaluated on
the validation data before training as the result is after it; the base is always
evaluated there too, so a result is read against where it started.  The loop is
transformers' ``Trainer`` for supervised jobs and TRL's trainer of the objective for
preference jobs (``DPOTrainer``, ``KTOTrainer``, ``ORPOTrainer``), each with callbacks that
print the progress protocol (``runner.py`` documents it) on stdout — the same lines a
custom script prints.  With an adapter, TRL's reference model is the base itself (the
adapter switched off), so a preference job holds one copy of the weights.  Checkpoints (adapter
or model, optimizer, scheduler, RNG) go to ``output_dir/checkpoint-<step>`` every
``save_steps``; ``resume_from`` continues one.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cyllm import errors
from cyllm.training import methods
from cyllm.training.data import DatasetError, Reading, load_examples, load_preferences, tokenize
from cyllm.training.spec import DEFAULT_BETA, PREFERENCE_OBJECTIVES, TrainingSpec
from cyllm.worker.training import harness, presets

Emit = Callable[[dict[str, Any]], None]


def print_event(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def run(job: dict[str, Any], emit: Emit = print_event) -> dict[str, Any]:
    """Train as ``job`` says; emit progress; return the result event (also emitted)."""
    # the datasets library's cache (evaluation tasks' data) in the job's folder
    os.environ.setdefault("HF_DATASETS_CACHE", str(Path(job["output_dir"]) / "hf-datasets"))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

    spec = TrainingSpec.parse(job["spec"])
    out = Path(job["output_dir"])
    device = job.get("device", "cpu")
    ranks = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's, when the job asked for processes
    first = int(os.environ.get("RANK", "0")) == 0  # the process that reports and saves
    if not first:
        emit = _silent
    if device.startswith("cuda") and ranks > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if job.get("threads") or ranks > 1:  # the processes of a job share the cores
        threads = int(job.get("threads") or 0) or len(os.sched_getaffinity(0))  # (torchrun says 1)
        torch.set_num_threads(max(1, threads // ranks) if device == "cpu" else threads)
    transformers.logging.set_verbosity_error()
    quant = methods.quantization_config(spec.quantization, device)

    def load(path: str) -> Any:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
            quantization_config=quant,
            device_map={"": device} if quant else None,
        )
        return model if quant else model.to(device)

    # 1. data and evaluation tasks, refused before any model is loaded
    tasks = (
        harness.task_manager(job.get("eval_tasks_dir"), bool(job.get("eval_builtin_tasks")))
        if spec.eval_tasks
        else None
    )
    if tasks is not None:
        harness.check_tasks(spec.eval_tasks, tasks)

    def run_tasks(model_path: str, adapter: str | None = None) -> dict[str, float]:
        return harness.run_tasks(
            spec.eval_tasks, tasks, model_path, adapter, device, spec.eval_limit, spec.seed, spec.batch_size
        )

    tokenizer = AutoTokenizer.from_pretrained(job["base_model_path"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    preference = spec.objective in PREFERENCE_OBJECTIVES
    read = _preference_rows if preference else _supervised_rows
    formatters = job.get("formatters") or ()
    train_rows = read(spec, Reading.of(spec, "dataset", formatters), spec.dataset, tokenizer, emit)
    eval_rows = (
        read(
            spec, Reading.of(spec, "validation_dataset", formatters), spec.validation_dataset, tokenizer, None
        )
        if spec.validation_dataset is not None
        else None
    )
    model_type = transformers.AutoConfig.from_pretrained(job["base_model_path"]).model_type
    packing = _packing(spec, model_type)
    if packing:  # rows of up to max_length tokens, several examples each: fewer steps
        examples = len(train_rows)
        train_rows = _pack(train_rows, spec.max_length)
        emit({"event": "log", "message": f"packed {examples} examples into {len(train_rows)} rows"})
    per_step = spec.batch_size * spec.gradient_accumulation_steps
    total_steps = spec.max_steps or max(1, math.ceil(len(train_rows) / per_step * spec.epochs))

    cuda = device.startswith("cuda")
    bf16 = _bfloat16(spec.precision, device)
    counter = _TokenCounter()
    config_cls, trainer_cls = _objective(spec.objective)
    objective_args: dict[str, Any] = (
        {"beta": spec.beta or DEFAULT_BETA, "max_length": spec.max_length}
        if preference
        else {"remove_unused_columns": False}
    )
    args = config_cls(
        output_dir=str(out),
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate or methods.default_learning_rate(spec.method),
        num_train_epochs=spec.epochs,
        max_steps=total_steps,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_steps,
        logging_steps=1,
        save_strategy="steps",
        save_steps=spec.save_steps,
        save_total_limit=methods.CHECKPOINTS_KEPT,
        seed=spec.seed,
        report_to=[spec.report_to] if spec.report_to != "none" else "none",
        eval_strategy="steps" if eval_rows else "no",
        eval_steps=spec.eval_steps or max(1, total_steps // 10),
        per_device_eval_batch_size=spec.batch_size,
        disable_tqdm=True,
        use_cpu=not cuda and not device.startswith("npu"),
        dataloader_pin_memory=False,
        bf16=bf16,
        ddp_backend=("gloo" if device == "cpu" else None) if ranks > 1 else None,
        **presets.arguments(spec.distributed, device, bf16),
        **objective_args,
    )
    emit({"event": "log", "message": "bfloat16 mixed precision" if bf16 else "float32"})
    if ranks > 1:
        backend = args.ddp_backend or "nccl"
        emit({"event": "log", "message": f"{ranks} processes, {backend}, {spec.distributed}"})
    # Supervised rows are tokenised here (the loss on responses only); TRL's trainers
    # tokenise their preference rows and collate them themselves.
    collator: Any = None
    if packing:
        collator = _Unpacking()
    elif not preference:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def trainer_for(model: Any, ref_model: Any = None, **more: Any) -> Any:
        # (TRL's trainers want the training rows even to evaluate)
        kwargs: dict[str, Any] = {
            "model": model,
            "args": args,
            "train_dataset": train_rows,
            "eval_dataset": eval_rows,
            **more,
        }
        if preference:
            kwargs["processing_class"] = tokenizer
            if spec.objective != "orpo":  # ORPO has no reference model
                kwargs["ref_model"] = ref_model
        else:
            kwargs["data_collator"] = collator
        trainer = trainer_cls(**kwargs)
        trainer.remove_callback(transformers.PrinterCallback)  # our events replace its prints
        return trainer

    # transformers' TensorBoard callback reads its folder from the environment (this
    # process is the job's own).
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))

    # 2. the base's scores on the validation data, which the result's are read against,
    # and what the result must beat to be promoted — on the same data, by the same measure
    # (a resumed run scored them on its first run)
    incumbent = job.get("incumbent")
    base_scores = None
    if eval_rows and not job.get("resume_from"):
        try:
            base_scores = _evaluate(
                trainer_for(*_incumbent({"kind": "base"}, job["base_model_path"], load, preference))
            )
        except Exception as exc:  # the job trains all the same; its result is read alone
            emit({"event": "log", "message": f"the base model could not be evaluated: {exc}"})
        else:
            emit({"event": "evaluation", "of": "base", "scores": base_scores})
    if tasks is not None and first and not job.get("resume_from"):
        emit({"event": "log", "message": f"evaluating the base on {', '.join(spec.eval_tasks)}"})
        emit({"event": "evaluation", "of": "base", "scores": run_tasks(job["base_model_path"])})
    if incumbent and eval_rows:
        try:
            if incumbent.get("kind") == "base" and base_scores is not None:
                scores = base_scores
            else:
                model, ref = _incumbent(incumbent, job["base_model_path"], load, preference)
                scores = _evaluate(trainer_for(model, ref))
                del model, ref
        except Exception as exc:  # the job trains all the same; the gate then says why not
            emit({"event": "log", "message": f"the alias's current target could not be evaluated: {exc}"})
        else:
            emit(
                {"event": "evaluation", "of": "incumbent", "model": incumbent.get("model"), "scores": scores}
            )

    # 3. model and method, the adapter's random start drawn from the job's seed (the same
    # in every process, and from one run to the next)
    transformers.set_seed(spec.seed)
    model = load(job["base_model_path"])
    if spec.method != "full":
        import peft

        if quant is not None:
            model = peft.prepare_model_for_kbit_training(model)
        config = methods.peft_config(
            spec.method,
            spec.options,
            model.config.model_type,
            total_steps,
            getattr(model.config, "hidden_size", None),
        )
        try:
            model = peft.get_peft_model(model, config)
        except (ValueError, TypeError, KeyError) as exc:
            raise errors.InvalidRequest(
                f"method {spec.method!r} does not apply to this model: {exc}", param="method"
            ) from None
        if spec.method == "pissa" and first and not (out / "pissa_init").exists():
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(out / "pissa_init")
            model.peft_config["default"].init_lora_weights = config.init_lora_weights

    # 4. the loop
    callbacks: list[TrainerCallback] = [_Progress(emit, counter, out)]
    if spec.method == "adalora":
        callbacks.append(_AdaLoraBudget())
    trainer_cls = _counting_trainer(trainer_cls, counter)
    trainer = trainer_for(
        model,
        callbacks=callbacks,
        processing_class=tokenizer,  # saved with each checkpoint: a full one is a servable folder
    )
    trainer.train(resume_from_checkpoint=job.get("resume_from") or None)
    if eval_rows:  # the result's score: the last step's evaluation
        final = [h for h in trainer.state.log_history if h.get("step") == trainer.state.global_step]
        metrics = next((h for h in final if "eval_loss" in h), None) or trainer.evaluate()
        emit({"event": "evaluation", "of": "result", "scores": _scores(metrics)})
    if first:
        _plot(trainer.state.log_history, out, f"{spec.method} on {spec.base_model}")

    # 5. the result (saved by the first process; the others have the same weights)
    if spec.method == "full":
        path, kind = out / "model", "model"
        trainer.save_model(str(path))  # the first process writes, the others wait for it
        if first:
            tokenizer.save_pretrained(str(path))
    else:
        path = out / "adapter"
        kind = "adapter" if spec.method in methods.SHARED_BASE else "peft"
        extra: dict[str, Any] = (
            {"path_initial_model_for_weight_conversion": str(out / "pissa_init")}
            if spec.method == "pissa"
            else {}
        )
        if first:
            model.save_pretrained(str(path), **extra)
    step = trainer.state.global_step
    if tasks is not None and first:  # the result, loaded by the harness as it is served
        del trainer, model
        gc.collect()
        emit({"event": "log", "message": f"evaluating the result on {', '.join(spec.eval_tasks)}"})
        scores = run_tasks(str(path)) if kind == "model" else run_tasks(job["base_model_path"], str(path))
        emit({"event": "evaluation", "of": "result", "scores": scores})
    result = {
        "event": "result",
        "kind": kind,
        "path": str(path),
        "trained_tokens": counter.total,
        "step": step,
    }
    emit(result)
    return result


def _objective(objective: str) -> tuple[type, type]:
    """The arguments class and trainer class of a training objective."""
    import transformers

    if objective == "sft":
        return transformers.TrainingArguments, transformers.Trainer
    if objective == "orpo":
        # TRL keeps ORPO in trl.experimental (its API may change between releases: the
        # version is pinned in constraints.txt).
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOConfig, ORPOTrainer
    import trl

    return {"dpo": (trl.DPOConfig, trl.DPOTrainer), "kto": (trl.KTOConfig, trl.KTOTrainer)}[objective]


def _packing(spec: TrainingSpec, model_type: str) -> bool:
    """Whether the job's examples are packed: as asked, else where it is safe."""
    safe = spec.objective == "sft" and methods.packs(spec.method, model_type)
    if spec.packing and not safe:
        raise errors.InvalidRequest(
            f"packing: {model_type!r} models with method {spec.method!r} cannot keep packed examples "
            f"apart here (packed: {', '.join(methods.PACKABLE)}, not adaliprompt)",
            param="packing",
        )
    return safe if spec.packing is None else spec.packing


def _bfloat16(precision: str, device: str) -> bool:
    if precision != "auto":
        return precision == "bfloat16"
    from cyllm.worker.devices import cpu_has_bfloat16

    return device.startswith(("cuda", "npu")) or (device == "cpu" and cpu_has_bfloat16())


def _pack(rows: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """TRL's best-fit-decreasing packing: bins of at most ``max_length`` tokens, each
    remembering its examples' lengths (``seq_lengths``)."""
    import datasets
    import trl

    packed = trl.pack_dataset(datasets.Dataset.from_list(rows), max_length, strategy="bfd")
    return list(packed.to_list())


class _Unpacking:
    """A batch of packed rows (or plain examples) → one row of its examples end to end,
    with position ids restarting at each, through transformers' flattening collator; the
    model's attention then keeps them apart (``methods.PACKABLE``; the test compares with
    the same examples padded), and no token is padding."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples = []
        for row in rows:
            start = 0
            for n in row.get("seq_lengths") or [len(row["input_ids"])]:
                examples.append(
                    {
                        "input_ids": row["input_ids"][start : start + n],
                        "labels": row["labels"][start : start + n],
                    }
                )
                start += n
        # No cache: with one, transformers takes the call for generation and does not look
        # for packed examples in the position ids (they would attend to each other).
        return {**self.flatten(examples), "use_cache": False}


def _supervised_rows(
    spec: TrainingSpec, reading: Reading, path: str, tokenizer: Any, emit: Emit | None
) -> list[dict[str, Any]]:
    """Conversations, tokenised with the loss on the responses only."""
    examples = load_examples(path, reading)
    rows = [t for t in (tokenize(e, tokenizer, spec.max_length) for e in examples) if t is not None]
    which = "dataset" if emit else "validation_dataset"
    if not rows:
        raise DatasetError(f"{which}: every example's response lies beyond max_length {spec.max_length}")
    if emit:
        emit(
            {
                "event": "log",
                "message": f"{len(examples)} examples ({len(examples) - len(rows)} "
                f"dropped: no response within max_length {spec.max_length})",
            }
        )
    return [{"input_ids": t.input_ids, "labels": t.labels} for t in rows]


def _preference_rows(
    spec: TrainingSpec, reading: Reading, path: str, tokenizer: Any, emit: Emit | None
) -> Any:
    """Pairs (or judged answers) as TRL's conversational rows; TRL applies the chat
    template, cuts at max_length, and unpairs pairs for KTO."""
    import datasets

    records = load_preferences(path, reading, spec.objective)
    if emit:
        emit({"event": "log", "message": f"{len(records)} preference records"})
    return datasets.Dataset.from_list([r.as_row() for r in records])


def _incumbent(
    incumbent: dict[str, Any], base_path: str, load: Callable[[str], Any], preference: bool
) -> tuple[Any, Any]:
    """The model a promotion must beat (the base, an adapter on it, or full weights) and,
    for a preference objective, the reference it is scored against: the base, as for the
    result (an adapter's reference is its base with the adapter off; None lets TRL copy)."""
    kind = incumbent.get("kind")
    if kind == "model":
        return load(str(incumbent["path"])), load(base_path) if preference else None
    model = load(base_path)
    if kind in ("adapter", "peft"):
        import peft

        model = peft.PeftModel.from_pretrained(model, str(incumbent["path"]))
    return model, None


def _evaluate(trainer: Any) -> dict[str, float]:
    """A model's scores on the validation rows, measured as the trainer measures the
    result (its evaluation loop, batch size, collator and reference), so the two compare."""

    import torch

    scores = _scores(trainer.evaluate())
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return scores


# TRL's evaluation metrics → the scores stored with a job and its model
_PREFERENCE_SCORES = {
    "eval_rewards/accuracies": "preference_accuracy",
    "eval_rewards/margins": "reward_margin",
}


def _scores(metrics: dict[str, Any]) -> dict[str, float]:
    """``eval_loss`` (what a promotion compares; lower is better); for supervised jobs its
    perplexity, for preference objectives (TRL logs their rewards) how often the chosen
    answer is preferred and by how much."""
    scores = {"eval_loss": float(metrics["eval_loss"])}
    if any(key.startswith("eval_rewards/") for key in metrics):
        scores.update({name: float(metrics[k]) for k, name in _PREFERENCE_SCORES.items() if k in metrics})
    else:
        scores["perplexity"] = math.exp(min(scores["eval_loss"], 50.0))  # (capped: no overflow)
    return scores


def _plot(history: list[dict[str, Any]], out: Path, title: str) -> None:
    """loss.png in the job folder, from the trainer's log (resumed runs included)."""
    from cyllm.training.plot import loss_png

    train = sorted({h["step"]: h["loss"] for h in history if "loss" in h}.items())
    evaluation = sorted({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}.items())
    (out / "loss.png").write_bytes(loss_png(train, evaluation, title))


# A batch's real tokens: one mask (supervised, DPO, KTO), or ORPO's pair of masks (each
# holding the prompt and its answer); a packed batch has no mask and no padding
_MASKS = ("attention_mask", "chosen_attention_mask", "rejected_attention_mask")


def _everyones(n: int) -> int:
    """``n`` summed over the job's processes (each counts its own batches; every process
    computes each step's loss, so the sum is taken in step)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return n
    import torch

    total = torch.tensor([n], dtype=torch.long)
    if dist.get_backend() == "nccl":
        total = total.cuda()
    dist.all_reduce(total)
    return int(total.item())


class _TokenCounter:
    """Real (unpadded) tokens the model has trained on in this run."""

    def __init__(self) -> None:
        self.total = 0


def _counting_trainer(base, counter: _TokenCounter):
    """``Trainer`` counting each batch's tokens as the loss is computed (the data loader
    runs a batch ahead, so counting in the collator would be early)."""

    class CountingTrainer(base):
        def compute_loss(self, model, inputs, *args, **kwargs):
            if model.training:
                masks = [k for k in _MASKS if k in inputs]
                n = sum(int(inputs[k].sum()) for k in masks) if masks else int(inputs["input_ids"].numel())
                counter.total += _everyones(n)
            return super().compute_loss(model, inputs, *args, **kwargs)

    return CountingTrainer


class _Progress(TrainerCallback):
    """Trainer callbacks → progress and checkpoint events."""

    def __init__(self, emit: Emit, counter: _TokenCounter, out: Path) -> None:
        self.emit, self.counter, self.out = emit, counter, out
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.mark = (time.monotonic(), 0)  # (when, tokens) at the start of this run

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step  # > 0 when resumed
        self.started = time.monotonic()
        self.mark = (self.started, self.counter.total)
        if state.global_step:
            self.emit({"event": "log", "message": f"resumed from step {state.global_step}"})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        now = time.monotonic()
        since, tokens = self.mark  # since this run began (the collator may run a batch ahead)
        done = state.global_step - (self.first_step or 0)
        per_step = (now - self.started) / max(1, done)
        self.emit(
            {
                "event": "progress",
                "step": state.global_step,
                "total_steps": state.max_steps,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate", 0.0),
                "tokens_per_second": round((self.counter.total - tokens) / max(now - since, 1e-6), 1),
                "eta_s": round(per_step * (state.max_steps - state.global_step), 1),
                "tokens": self.counter.total,
            }
        )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.emit({"event": "eval", "step": state.global_step, "eval_loss": metrics["eval_loss"]})

    def on_save(self, args, state, control, **kwargs):
        path = self.out / f"checkpoint-{state.global_step}"
        self.emit({"event": "checkpoint", "step": state.global_step, "path": str(path)})


class _AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates its rank budget after each optimizer step (PEFT's recipe)."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def _silent(event: dict[str, Any]) -> None:
    """The events of a process other than the first: the first reports for all."""


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        run(job)
    except errors.CyllmError as exc:
        if int(os.environ.get("RANK", "0")) == 0:
            print_event({"event": "error", "code": exc.code, "message": exc.message})
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
