"""Schemas of OpenAI's files and fine-tuning API, as the official client reads them."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cyllm import errors
from cyllm.protocol import pb
from cyllm.training import methods
from cyllm.training.spec import DEFAULT_BETA, TrainingSpec

Auto = Literal["auto"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None

    @classmethod
    def of(cls, f: pb.FileInfo) -> FileObject:
        return cls(id=f.id, bytes=f.bytes, created_at=f.created_at, filename=f.filename, purpose=f.purpose)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"


class Supervised(BaseModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class DpoHyperparameters(Hyperparameters):
    beta: float | Auto = "auto"


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(BaseModel):
    """OpenAI's method: supervised, or DPO on preference pairs (TRL's DPOTrainer).  ORPO
    and KTO, which OpenAI does not name, are the native ``objective`` (``training``)."""

    type: Literal["supervised", "dpo"] = Field(
        "supervised", description="'reinforcement' is not offered: refused"
    )
    supervised: Supervised | None = None
    dpo: Dpo | None = None


class FineTuningJobRequest(BaseModel):
    """OpenAI's fields, plus ``training``: any field of the native job (``method`` such as
    ``"dora"``, ``options``, ``max_steps``, ``max_length``, ``save_steps``, ...), given
    through the client's ``extra_body``."""

    model_config = ConfigDict(extra="ignore")

    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")
    seed: int | None = None
    validation_file: str | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    training: dict[str, Any] = Field(default_factory=dict)

    def hyper(self) -> Hyperparameters:
        if self.method is not None:
            given = self.method.dpo if self.method.type == "dpo" else self.method.supervised
            if given is not None:
                return given.hyperparameters
        return self.hyperparameters or Hyperparameters()

    def spec(self) -> dict[str, Any]:
        """The native job spec this request asks for (validated by the coordinator)."""
        given = self.training.get("base_model", self.model)
        if given != self.model:
            raise errors.InvalidRequest(
                f"training.base_model ({str(given)[:100]!r}) differs from model ({self.model!r}): "
                "name the model to train once, in model",
                param="training.base_model",
            )
        spec: dict[str, Any] = {**self.training, "base_model": self.model, "dataset": "(uploaded file)"}
        if self.method is not None and self.method.type == "dpo":
            if spec.get("objective", "dpo") != "dpo":
                raise errors.InvalidRequest(
                    f"method.type is 'dpo' but training.objective is {str(spec['objective'])[:20]!r}",
                    param="training.objective",
                )
            spec["objective"] = "dpo"
        h = self.hyper()
        if isinstance(h, DpoHyperparameters) and h.beta != "auto":
            spec["beta"] = h.beta
        if h.n_epochs != "auto":
            spec["epochs"] = h.n_epochs
        if h.batch_size != "auto":
            spec["batch_size"] = h.batch_size
        if h.learning_rate_multiplier != "auto":
            base = methods.default_learning_rate(spec.get("method", "lora"))
            spec["learning_rate"] = base * h.learning_rate_multiplier
        if self.suffix:
            spec["suffix"] = self.suffix
        if self.seed is not None:
            spec["seed"] = self.seed
        return spec


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str = "cyllm"
    result_files: list[str] = Field(default_factory=list)
    seed: int
    status: str = Field(description="queued | running | succeeded | failed | cancelled")
    trained_tokens: int | None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    method: dict[str, Any]
    user_provided_suffix: str | None
    metadata: dict[str, str] | None = None
    training: dict[str, Any] = Field(description="CY-LLM: the whole job spec, progress included")

    @classmethod
    def of(cls, job: pb.TrainingJob) -> FineTuningJob:
        spec = TrainingSpec.model_validate_json(job.spec_json)
        hyper = {
            "n_epochs": spec.epochs,
            "batch_size": spec.batch_size,
            "learning_rate_multiplier": (spec.learning_rate or methods.default_learning_rate(spec.method))
            / methods.default_learning_rate(spec.method),
        }
        eta = int(job.progress.eta_s) if job.state == "running" and job.progress.step else 0
        progress = {
            "step": job.progress.step,
            "total_steps": job.progress.total_steps,
            "loss": job.progress.loss,
            "tokens_per_second": job.progress.tokens_per_second,
        }
        return cls(
            id=job.id,
            created_at=job.created_at,
            error=JobError(code=job.error_code, message=job.error) if job.error else None,
            fine_tuned_model=job.fine_tuned_model or None,
            finished_at=job.finished_at or None,
            hyperparameters=hyper,
            model=spec.base_model,
            seed=spec.seed,
            status=job.state,
            trained_tokens=job.trained_tokens if job.state == "succeeded" else None,
            training_file=job.training_file or spec.dataset,
            validation_file=job.validation_file or spec.validation_dataset,
            estimated_finish=int(job.started_at + eta) if eta else None,
            method=(
                {"type": "supervised", "supervised": {"hyperparameters": hyper}}
                if spec.objective == "sft"
                else {
                    "type": spec.objective,
                    spec.objective: {"hyperparameters": {**hyper, "beta": spec.beta or DEFAULT_BETA}},
                }
            ),
            user_provided_suffix=spec.suffix,
            training={
                **json.loads(spec.model_dump_json(exclude_none=True)),
                "progress": progress,
                "attempts": job.attempts,
                "evaluation": dict(job.evaluation),
                "promotion": job.promotion or None,
            },
        )


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"]

    @classmethod
    def of(cls, job_id: str, e: pb.TrainingEvent) -> JobEvent:
        data = None
        if e.type == "metrics":
            p = e.progress
            data = {
                "step": p.step,
                "total_steps": p.total_steps,
                "train_loss": p.loss,
                "learning_rate": p.learning_rate,
                "tokens_per_second": p.tokens_per_second,
                "epoch": p.epoch,
                "eta_s": p.eta_s,
            }
        elif e.type == "eval":
            data = {"step": e.progress.step, "valid_loss": e.progress.eval_loss}
        elif e.type == "evaluation":
            data = dict(e.scores)
        return cls(
            id=f"ftevent-{job_id.removeprefix('ftjob-')}-{e.seq}",
            created_at=e.created_at // 1000,
            level={"warn": "warn", "error": "error"}.get(e.level, "info"),
            message=e.message,
            data=data,
            type="metrics" if e.type in ("metrics", "eval") else "message",
        )


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEvent]
    has_more: bool


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str = Field(description="the model it is served as")
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int


class JobCheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobCheckpoint]
    has_more: bool
    first_id: str | None
    last_id: str | None
