"""Fine-tuning methods: the names of docs/design.md mapped onto the ``peft`` library.

========== ===============================================================
``lora``        ``LoraConfig``
``dora``        ``LoraConfig(use_dora=True)``
``pissa``       ``LoraConfig(init_lora_weights="pissa")``; saved converted to plain
                LoRA so it applies to the unchanged base model
``adalora``     ``AdaLoraConfig`` (rank budget reallocated every optimizer step)
``ia3``         ``IA3Config``
``loha``        ``LoHaConfig``
``lokr``        ``LoKrConfig``
``vera``        ``VeraConfig``
``fourier``     ``FourierFTConfig``
``adaliprompt`` ``AdaptionPromptConfig`` — LLaMA-Adapter's adaption prompts. The design's
                "adaliprompt" (adaptive prompt) has no library of that name; PEFT's
                adaption prompt is the adaptive-prompt method it ships (Llama, Mistral,
                GPT-2 style models only).
``full``        every parameter trained, no PEFT
========== ===============================================================

``options`` pass through to the PEFT config (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``, ...); an unknown option is refused with the config's name.  Target
modules default per architecture (attention and MLP projections of Llama-style models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cyllm import errors

# PEFT methods whose result the worker serves as ``<base>:<adapter>`` beside the base
# (mixed-adapter batches); the others are served as a model of their own with the
# adapter applied (merged where PEFT can merge).
SHARED_BASE = ("lora", "pissa")
# The trainer keeps a job's last checkpoints; when the job succeeds each becomes a model
# of its own, served as the result is — except PiSSA's, whose checkpoints hold residual
# weights that only its modified base gives meaning to (its result is converted).
CHECKPOINTS_KEPT = 3
UNSERVABLE_CHECKPOINTS = ("pissa", "custom")
LEARNING_RATES = {"full": 2e-5, "ia3": 3e-3, "adaliprompt": 9e-3, "vera": 5e-3, "fourier": 5e-3}
DEFAULT_LEARNING_RATE = 2e-4

_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_TARGETS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


# Model families whose attention (transformers 5's ``create_causal_mask``) keeps packed
# examples apart: given position ids that restart at each example and no attention mask,
# it builds a block-diagonal mask.  Packing is on by default for these only (and never
# for adaption prompts, which add attention of their own).
PACKABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


def packs(method: str, model_type: str) -> bool:
    return model_type in PACKABLE and method != "adaliprompt"


def default_learning_rate(method: str) -> float:
    return LEARNING_RATES.get(method, DEFAULT_LEARNING_RATE)


# What a method's options may ask: a job's memory grows with its adapter's size (a LoRA
# rank of 4096 took a 135M model's job to 4 GB), so the sizes are bounded by what is
# sensible for any model; a rank is also bounded by the model's width, where it is
# known (``peft_config``).  Lists and maps (target modules, rank patterns) are bounded
# in length.
SIZE_BOUNDS: dict[str, tuple[float, float]] = {
    "r": (1, 1024),
    "init_r": (1, 1024),
    "target_r": (1, 1024),
    "lora_alpha": (0, 1 << 16),
    "alpha": (0, 1 << 16),
    "lora_dropout": (0, 1),
    "module_dropout": (0, 1),
    "rank_dropout": (0, 1),
    "n_frequency": (1, 100_000),
    "adapter_len": (1, 1024),
    "adapter_layers": (1, 1024),
}
VERA_MAX_RANK = 8192  # VeRA shares its random matrices across layers: a rank costs little
MAX_OPTION_ITEMS = 256


def check_options(method: str, options: dict[str, Any], width: int | None = None) -> None:
    """InvalidRequest naming the first option out of its bounds; ``width``: the model's
    hidden size, which a rank may not pass."""
    for name, value in options.items():
        if isinstance(value, (list, dict)) and len(value) > MAX_OPTION_ITEMS:
            raise errors.InvalidRequest(
                f"options.{name}: at most {MAX_OPTION_ITEMS} entries", param=f"options.{name}"
            )
        bound = SIZE_BOUNDS.get(name)
        if bound is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # PEFT refuses what is not its field or of the wrong type
        low, high = bound
        if name == "r" and method == "vera":
            high = VERA_MAX_RANK
        elif name in ("r", "init_r", "target_r") and width is not None:
            high = min(high, width)
        if not low <= value <= high:
            raise errors.InvalidRequest(
                f"options.{name} is {value}; for method {method!r} it must be between {low:g} and {high:g}"
                + (" (the model's hidden size)" if high == width else ""),
                param=f"options.{name}",
            )


def peft_config(
    method: str, options: dict[str, Any], model_type: str, total_steps: int, width: int | None = None
):
    """The PEFT config for ``method`` with the user's ``options``; InvalidRequest if unusable.
    ``width``: the model's hidden size (a rank's bound)."""
    import peft

    check_options(method, options, width)

    targets = _TARGETS.get(model_type, "all-linear")
    attention = targets[:2] if isinstance(targets, list) else targets
    cls: type[peft.PeftConfig]
    defaults: dict[str, Any]
    if method in ("lora", "dora", "pissa"):
        cls, defaults = (
            peft.LoraConfig,
            {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": targets},
        )
        if method == "dora":
            defaults["use_dora"] = True
        if method == "pissa":
            defaults["init_lora_weights"] = "pissa_niter_4"
            defaults["lora_dropout"] = 0.0
    elif method == "adalora":
        cls, defaults = (
            peft.AdaLoraConfig,
            {
                "init_r": 12,
                "target_r": 8,
                "lora_alpha": 32,
                "target_modules": targets,
                "total_step": total_steps,
                "tinit": 0,
                "tfinal": 0,
            },
        )
    elif method == "ia3":
        ff = ["down_proj"] if isinstance(targets, list) and "down_proj" in targets else []
        cls, defaults = (
            peft.IA3Config,
            {
                "target_modules": (["k_proj", "v_proj"] + ff) if isinstance(targets, list) else targets,
                "feedforward_modules": ff,
            },
        )
    elif method == "loha":
        cls, defaults = peft.LoHaConfig, {"r": 8, "alpha": 16, "target_modules": targets}
    elif method == "lokr":
        cls, defaults = peft.LoKrConfig, {"r": 8, "alpha": 16, "target_modules": targets}
    elif method == "vera":
        cls, defaults = peft.VeraConfig, {"r": 256, "target_modules": attention}
    elif method == "fourier":
        cls, defaults = (
            peft.FourierFTConfig,
            {"n_frequency": 1000, "scaling": 150.0, "target_modules": attention},
        )
    elif method == "adaliprompt":
        cls, defaults = peft.AdaptionPromptConfig, {"adapter_len": 10, "adapter_layers": 8}
    else:
        raise errors.InvalidRequest(f"{method!r} is not a PEFT method", param="method")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise errors.InvalidRequest(
            f"options {unknown} are not {cls.__name__} fields (method {method!r})", param="options"
        )
    try:
        return cls(task_type="CAUSAL_LM", **{**defaults, **options})
    except (TypeError, ValueError) as exc:
        raise errors.InvalidRequest(f"method {method!r}: {exc}", param="options") from None


def quantization_config(mode: str, device: str):
    """bitsandbytes 4-/8-bit loading (QLoRA): CUDA only, refused clearly elsewhere."""
    if mode == "none":
        return None
    if not device.startswith("cuda"):
        raise errors.InvalidRequest(
            f"quantization {mode!r} (QLoRA through bitsandbytes) needs an NVIDIA GPU with CUDA; "
            f"this worker trains on {device!r}. Use quantization 'none'.",
            param="quantization",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise errors.InvalidRequest(
            "quantization needs the bitsandbytes package on the worker: pip install bitsandbytes",
            param="quantization",
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)
