"""What a training job is: one pydantic model, validated where a job enters the system
(the coordinator) and again where it runs (the worker)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cyllm import errors
from cyllm.paths import ALIAS_PATTERN
from cyllm.training import methods

KEEP_ALIVE_S = 300.0  # a fine-tuned model unused this long is unloaded (0: never)

Method = Literal[
    "lora",
    "adalora",
    "ia3",
    "loha",
    "lokr",
    "dora",
    "pissa",
    "vera",
    "fourier",
    "adaliprompt",
    "hyenadna",
    "full",
    "custom",
]
# A container (json, jsonl, csv, parquet, hf) or a record shape: a formatter's name,
# built in or a deployment's (training/formats.py), known where the dataset is read.
FORMAT_PATTERN = r"^[a-z][a-z0-9_]{0,39}$"
HUB = "hf://"  # a dataset on the Hugging Face Hub (or the HF_ENDPOINT the server names)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# What the job optimises: supervised next-token loss on conversations, or a preference
# objective on pairs through TRL (DPO; ORPO, reference-free; KTO, also on unpaired data).
Objective = Literal["sft", "dpo", "orpo", "kto"]
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "kto")
DEFAULT_BETA = 0.1  # TRL's, for each preference objective

# The design lists HyenaDNA among the adapter methods; it is a model family, not a method.
HYENADNA = (
    "'hyenadna' is not a fine-tuning method: HyenaDNA is a family of genomic models "
    "(long convolutions over DNA). To fine-tune a HyenaDNA checkpoint, serve it as the "
    "base model and choose a method such as 'lora' or 'full'."
)


class TrainingSpec(BaseModel):
    """A fine-tuning job.  Hyper-parameters left unset take the method's defaults
    (``train.default_learning_rate``)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(min_length=1, description="a model id from the workers' catalog")
    method: Method = "lora"
    objective: Objective = Field(
        "sft",
        description="sft: supervised, on conversations; dpo, orpo, kto: preference training on "
        "pairs (kto also on judged answers), with the method's adapter or all weights (full)",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="data-parallel processes (torchrun; gloo on CPUs, NCCL on GPUs): each takes "
        "batch_size examples a step, so the global batch is processes x batch_size",
    )
    devices: Literal["all"] | None = Field(
        None,
        description="all: one process per GPU (or NPU) of the worker, which then runs no other "
        "job; overrides processes (a CPU worker runs one process)",
    )
    distributed: Literal["ddp", "fsdp", "zero2", "zero3"] = Field(
        "ddp",
        description="how the processes share the model: ddp (each holds it all), fsdp (PyTorch "
        "FSDP, sharded), zero2/zero3 (DeepSpeed ZeRO); the sharded ones on GPUs only",
    )
    packing: bool | None = Field(
        None,
        description="supervised jobs: examples laid end to end in rows of max_length tokens, "
        "none attending to another (fewer steps, no padding); default: on where the model's "
        "attention keeps packed examples apart",
    )
    precision: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="auto: bfloat16 mixed precision on a GPU, an NPU or a CPU with native "
        "bfloat16 (AVX-512 BF16, AMX), float32 elsewhere",
    )
    beta: float | None = Field(
        None,
        gt=0,
        le=100,
        description="preference objectives: how far from the base the result may move "
        "(TRL's beta; default 0.1)",
    )
    dataset: str = Field(
        min_length=1,
        description="a path under the server's datasets folders, an uploaded file (training_file), "
        "or a Hub dataset 'hf://org/name' (where the server allows it)",
    )
    dataset_format: str | None = Field(
        None,
        pattern=FORMAT_PATTERN,
        description="json, jsonl, csv, parquet, hf, or a record shape (openai, sharegpt, alpaca, "
        "prompt_completion, text_label, openai_dpo, pairs, judged, or the server's own); default: detected",
    )
    dataset_config: str | None = Field(
        None, pattern=r"^[\w.-]{1,100}$", description="a Hub or hf dataset's config (subset)"
    )
    dataset_revision: str | None = Field(
        None, pattern=r"^[\w.-][\w./-]{0,99}$", description="a Hub dataset's branch, tag or commit"
    )
    dataset_split: str = Field(
        "train", pattern=r"^[\w.-]{1,100}$", description="the split of a Hub or hf dataset to train on"
    )
    validation_dataset: str | None = Field(
        None, description="held-out examples, in the dataset's format: their loss is reported as eval_loss"
    )
    validation_split: str | None = Field(
        None,
        pattern=r"^[\w.-]{1,100}$",
        description="the split of a Hub or hf validation_dataset; default: 'validation' when it is "
        "the dataset itself, else 'train'",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="evaluate every N steps; default: ten times over the run (with a validation_dataset)",
    )
    eval_tasks: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]{0,99}$")]] = Field(
        default_factory=list,
        max_length=16,
        description="lm-evaluation-harness tasks the base and the result are scored on (the "
        "worker's task files; the harness's own where the worker allows)",
    )
    eval_limit: int | None = Field(
        None, ge=1, le=100_000, description="examples per evaluation task (default: all of them)"
    )
    report_to: Literal["none", "tensorboard"] = Field(
        "none", description="tensorboard: TensorBoard logs in the job folder's tensorboard/"
    )
    prompt_column: str | None = Field(None, description="CSV/Parquet/HF: the prompt column")
    response_column: str | None = Field(None, description="CSV/Parquet/HF: the response column")
    epochs: float = Field(3.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs")
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0, le=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_length: int = Field(512, ge=16, le=131072, description="tokens per example; longer are cut")
    save_steps: int = Field(50, ge=1, description="a checkpoint every N optimizer steps")
    seed: int = 42
    options: dict[str, Any] = Field(
        default_factory=dict, description="the PEFT method's own options (r, lora_alpha, ...)"
    )
    quantization: Literal["none", "4bit", "8bit"] = "none"
    script: str | None = Field(None, description="custom: a script in worker.training_scripts_dir")
    script_args: list[str] = Field(default_factory=list)
    time_limit_s: float | None = Field(None, gt=0)
    suffix: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    keep_alive_s: float = Field(
        KEEP_ALIVE_S,
        ge=0,
        description="the result unloads after this long unused (0: never); it loads again when asked",
    )
    promote_to: str | None = Field(
        None,
        pattern=ALIAS_PATTERN,
        description="an alias of yours to point at the result, only if its loss on the validation "
        "data is below the alias's current target's (needs validation data)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.method == "hyenadna":
            raise ValueError(HYENADNA)
        if (self.method == "custom") != (self.script is not None):
            raise ValueError("'script' goes with method 'custom', and only there")
        if self.quantization != "none" and self.method in ("full", "custom"):
            raise ValueError(f"quantization is for adapter methods, not {self.method!r}")
        if self.objective != "sft" and self.method == "custom":
            raise ValueError(
                f"objective {self.objective!r} needs a PEFT adapter or 'full', not {self.method!r}"
            )
        if (self.processes > 1 or self.devices) and self.method == "custom":
            raise ValueError("processes: a custom script starts its own processes")
        if self.distributed != "ddp" and self.quantization != "none":
            raise ValueError(f"distributed {self.distributed!r} does not shard a quantized model")
        if self.packing and self.objective != "sft":
            raise ValueError("packing is for supervised jobs (objective 'sft')")
        if self.beta is not None and self.objective == "sft":
            raise ValueError("beta is for preference objectives (dpo, orpo, kto)")
        for field in ("dataset", "validation_dataset"):
            given = getattr(self, field)
            if given and given.startswith(HUB) and not HUB_ID.match(given.removeprefix(HUB)):
                raise ValueError(f"{field}: a Hub dataset is 'hf://org/name'")
        if self.dataset_revision and ".." in self.dataset_revision.split("/"):
            raise ValueError("dataset_revision: a branch, tag or commit, without '..'")
        if self.eval_tasks and self.method == "custom":
            raise ValueError("eval_tasks needs the built-in trainer, not a custom script")
        if self.promote_to is not None and self.method == "custom":
            raise ValueError("promote_to needs the built-in trainer's evaluation, not a custom script's")
        try:
            methods.check_options(self.method, self.options)
        except errors.InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return self

    def split_of(self, field: str) -> str:
        """The split read of ``dataset`` or ``validation_dataset``."""
        if field == "dataset":
            return self.dataset_split
        if self.validation_split is not None:
            return self.validation_split
        return "validation" if self.validation_dataset == self.dataset else "train"

    @classmethod
    def parse(cls, raw: str | dict[str, Any]) -> TrainingSpec:
        """The spec, or InvalidRequest naming the field that is wrong."""
        try:
            return cls.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
        except json.JSONDecodeError as exc:
            raise errors.InvalidRequest(f"training spec is not JSON: {exc}") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            message = first["msg"].removeprefix("Value error, ")
            raise errors.InvalidRequest(f"{where}: {message}" if where else message, param=where) from None
