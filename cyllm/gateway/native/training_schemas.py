"""Schemas of the native training routes (camelCase, as the rest of ``/api/v1``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from cyllm.protocol import pb
from cyllm.training.spec import TrainingSpec


class Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class TrainingStartRequest(TrainingSpec):
    """The job (``TrainingSpec``'s fields in camelCase); the dataset is a path on the
    workers' disk (``dataset``) or an uploaded file (``fileId``, from ``POST /v1/files``)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    # None where a fileId names it instead (the coordinator makes that a path)
    dataset: str | None = Field(  # type: ignore[assignment]  # optional here, unlike the spec's
        None, description="a file or folder on the workers' disk"
    )
    file_id: str | None = Field(None, description="an uploaded file's id")
    validation_file_id: str | None = Field(
        None, description="an uploaded file's id: held-out examples (instead of validationDataset)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> TrainingStartRequest:
        if (self.dataset is None) == (self.file_id is None):
            raise ValueError("give exactly one of 'dataset' and 'fileId'")
        if self.validation_dataset is not None and self.validation_file_id is not None:
            raise ValueError("give at most one of 'validationDataset' and 'validationFileId'")
        return self

    def spec_json(self) -> str:
        return self.model_dump_json(exclude={"file_id", "validation_file_id"}, exclude_none=True)


class Progress(Camel):
    step: int
    total_steps: int
    epoch: float
    loss: float | None
    learning_rate: float
    tokens_per_second: float
    eta_s: float
    tokens: int
    eval_loss: float | None = Field(None, description="the last loss on the validation data")

    @classmethod
    def of(cls, p: pb.TrainingProgress, **override: Any) -> Progress:
        return cls(
            **{
                "step": p.step,
                "total_steps": p.total_steps,
                "epoch": p.epoch,
                "loss": p.loss,
                "learning_rate": p.learning_rate,
                "tokens_per_second": p.tokens_per_second,
                "eta_s": p.eta_s,
                "tokens": p.tokens,
                "eval_loss": p.eval_loss if p.HasField("eval_loss") else None,
                **override,
            }
        )


class Checkpoint(Camel):
    step: int
    path: str
    created_at: int
    loss: float | None
    model: str | None = Field(description="once the job succeeded, the model a kept checkpoint is served as")


class JobError(Camel):
    code: str
    message: str


class TrainingJobView(Camel):
    id: str
    state: str = Field(description="queued | running | succeeded | failed | cancelled")
    base_model: str
    method: str
    fine_tuned_model: str | None
    progress: Progress | None
    checkpoints: list[Checkpoint]
    error: JobError | None
    attempts: int
    worker_id: str | None
    trained_tokens: int
    created_at: int
    started_at: int | None
    finished_at: int | None
    spec: dict[str, Any]
    evaluation: dict[str, float] = Field(
        description="scores on the validation data: incumbent.eval_loss (the promote_to alias's "
        "target's, before training), result.eval_loss"
    )
    promotion: str | None = Field(description="what became of promote_to: promoted, or why not")

    @classmethod
    def of(cls, job: pb.TrainingJob) -> TrainingJobView:
        spec = TrainingSpec.model_validate_json(job.spec_json)
        p = job.progress
        return cls(
            id=job.id,
            state=job.state,
            base_model=spec.base_model,
            method=spec.method,
            fine_tuned_model=job.fine_tuned_model or None,
            progress=Progress.of(p, loss=p.loss if p.step else None) if job.HasField("progress") else None,
            checkpoints=[
                Checkpoint(
                    step=c.step,
                    path=c.path,
                    created_at=c.created_at,
                    loss=c.loss or None,
                    model=c.model or None,
                )
                for c in job.checkpoints
            ],
            error=JobError(code=job.error_code, message=job.error) if job.error else None,
            attempts=job.attempts,
            worker_id=job.worker_id or None,
            trained_tokens=job.trained_tokens,
            created_at=job.created_at,
            started_at=job.started_at or None,
            finished_at=job.finished_at or None,
            spec=spec.model_dump(mode="json", exclude_none=True),
            evaluation=dict(job.evaluation),
            promotion=job.promotion or None,
        )


class TrainingJobsResponse(Camel):
    jobs: list[TrainingJobView]
    has_more: bool


def event_dict(e: pb.TrainingEvent) -> dict[str, Any]:
    """A training event as the SSE stream's JSON (camelCase)."""
    out: dict[str, Any] = {
        "seq": e.seq,
        "createdAt": e.created_at,
        "type": e.type,
        "level": e.level,
        "message": e.message,
    }
    if e.type == "metrics":
        out["progress"] = Progress.of(e.progress).model_dump(by_alias=True)
    elif e.type == "eval":
        out["step"], out["evalLoss"] = e.progress.step, e.progress.eval_loss
    elif e.type == "checkpoint":
        out["checkpoint"] = {"step": e.checkpoint.step, "path": e.checkpoint.path}
    elif e.type == "state":
        out["state"] = e.state
    elif e.type == "result":
        out["result"] = {"kind": e.result_kind, "path": e.result_path}
    elif e.type == "evaluation":
        out["scores"] = dict(e.scores)
    return out
