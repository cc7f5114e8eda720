"""How a job's processes share the model: named presets over transformers' own
integrations (``TrainingArguments``' ``fsdp``/``fsdp_config`` and ``deepspeed``), so a
user names a strategy, not a config file.

=========  =====================================================================
ddp        every process holds the whole model; gradients all-reduced (gloo on
           CPUs, NCCL on GPUs).  The default; tested on CPU processes.
fsdp       PyTorch FSDP 2: parameters, gradients and optimizer state sharded over
           the GPUs, one transformer layer at a time; the full state dict gathered
           for the result.  GPUs only.
zero2      DeepSpeed ZeRO stage 2: optimizer state and gradients sharded.  GPUs
           only, with the ``deepspeed`` package.
zero3      DeepSpeed ZeRO stage 3: parameters too, gathered to save the result.
=========  =====================================================================

The GPU presets are written against the libraries' documented arguments and have not
been run on GPUs yet (the README's status table says so).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from cyllm import errors

SHARDED = ("fsdp", "zero2", "zero3")


def arguments(preset: str, device: str, bf16: bool) -> dict[str, Any]:
    """TrainingArguments' keywords for ``preset`` on ``device``, or InvalidRequest."""
    if preset == "ddp":
        return {}
    if not device.startswith("cuda"):
        raise errors.InvalidRequest(
            f"distributed: {preset!r} shards the model over GPUs; this worker trains on {device} (use 'ddp')",
            param="distributed",
        )
    if preset == "fsdp":
        return {
            "fsdp": True,
            "fsdp_config": {
                "fsdp_version": 2,
                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's own layer class
                "reshard_after_forward": True,
                "cpu_ram_efficient_loading": True,  # rank 0 reads the weights, the rest receive them
                "state_dict_type": "FULL_STATE_DICT",  # a servable result, not shards
            },
        }
    if importlib.util.find_spec("deepspeed") is None:
        raise errors.InvalidRequest(
            f"distributed: {preset!r} needs DeepSpeed on the worker (pip install deepspeed)",
            param="distributed",
        )
    stage = 2 if preset == "zero2" else 3
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # a servable result
    return {
        "deepspeed": {
            "zero_optimization": zero,
            "bf16": {"enabled": bf16},
            # "auto": filled in from the TrainingArguments (one source for each)
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
        }
    }
