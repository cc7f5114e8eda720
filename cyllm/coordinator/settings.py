"""Coordinator settings."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from cyllm.settings import ComponentSettings
from cyllm.training import formats
from cyllm.training.data import Limits


class CoordinatorSettings(ComponentSettings):
    section: ClassVar[str] = "coordinator"
    model_config = SettingsConfigDict(env_prefix="CYLLM_COORDINATOR_", extra="forbid")

    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50050, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    queue_max_size: int = Field(256, ge=1, description="waiting tasks; beyond this: 429")
    queue_timeout_s: float = Field(120.0, gt=0, description="longest wait for a worker slot")
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with a full queue")
    cache_ttl_s: float = Field(600.0, ge=0, description="0 disables the prompt cache")
    cache_max_entries: int = Field(
        1024, ge=0, description="prompt cache entries kept, least recently used out first (0: off)"
    )
    heartbeat_interval_s: float = Field(1.0, gt=0, description="how often workers are told to heartbeat")
    heartbeat_timeout_s: float = Field(5.0, gt=0, description="silence before a worker is unhealthy")
    progress_timeout_s: float = Field(
        60.0, gt=0, description="work in flight but no new token for this long: unhealthy (hung)"
    )
    routing: Literal["least_outstanding", "weighted_round_robin", "prefix_affinity"] = Field(
        "least_outstanding", description="which healthy worker with a free slot takes a request"
    )
    generation_attempts: int = Field(
        6, ge=1, description="workers a generation may run on when the one running it dies or hangs"
    )
    idempotency_ttl_s: float = Field(
        600.0, gt=0, description="how long the result of a request with an Idempotency-Key is kept"
    )
    breaker_failures: int = Field(3, ge=1, description="failures before a worker's circuit opens")
    breaker_cooldown_s: float = Field(10.0, gt=0, description="open circuit: skip the worker this long")
    redis_url: str | None = Field(
        None, description="redis://HOST:PORT/DB shares queue, cache and workers between coordinators"
    )
    coordinator_id: str | None = Field(None, description="default: host-port-pid")
    lease_s: float = Field(15.0, gt=0, description="a taken task returns to the queue if not renewed")
    state_db: Path = Field(
        default_factory=lambda: Path.home() / ".local" / "share" / "cyllm" / "state.db",
        description="without redis_url: the SQLite file that keeps training jobs, uploads' records, "
        "fine-tuned models, aliases and idempotency records across restarts",
    )
    files_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "cyllm" / "files",
        description="uploaded files; shared storage when workers are elsewhere",
    )
    files_max_bytes: int = Field(512 * 1024 * 1024, ge=1, description="largest upload")
    responses_ttl_s: float = Field(
        30 * 86_400.0, gt=0, description="how long /v1/responses keeps a stored response (store: true)"
    )
    responses_max_per_tenant: int = Field(
        10_000, ge=1, description="stored responses a tenant keeps; beyond it its oldest go first"
    )
    usage_retention_days: float = Field(
        400.0,
        gt=0,
        description="how long the usage ledger keeps an hour's rows (a year of months to compare)",
    )
    batch_max_requests: int = Field(50_000, ge=1, description="requests one batch file may hold")
    batch_max_output_bytes: int = Field(
        256 << 20, ge=1 << 16, description="results one batch may keep; past it its lines fail"
    )
    batch_max_open_per_tenant: int = Field(
        16, ge=1, description="batches a tenant may have running at once; beyond: 429"
    )
    training_max_attempts: int = Field(3, ge=1, description="runs of a job whose worker is lost")
    training_max_jobs_per_tenant: int = Field(4, ge=1, description="queued or running jobs per tenant")
    training_max_steps: int = Field(100_000, ge=1, description="largest max_steps a job may ask")
    training_max_time_s: float = Field(86_400.0, gt=0, description="every job's time limit, at most")
    # -- which datasets a job may read, and how much of them (coordinator/datasets.py)
    datasets_dirs: list[Path] = Field(
        default_factory=list, description="folders whose files a job may name by path"
    )
    datasets_any_path_for_admins: bool = Field(False, description="admins may name any path")
    dataset_max_rows: int = Field(1_000_000, ge=1, description="examples a dataset may hold")
    dataset_max_line_bytes: int = Field(4 << 20, ge=1024, description="a JSONL line or CSV field")
    dataset_max_depth: int = Field(32, ge=2, description="JSON nesting")
    dataset_read_memory_bytes: int = Field(
        1 << 30, ge=512 << 20, description="memory limit of the process that reads one"
    )
    dataset_read_timeout_s: float = Field(
        120.0,
        gt=0,
        description="time to read and check a dataset (and fetch one from the Hub) before it is refused",
    )
    dataset_formatters: list[str] = Field(
        default_factory=list,
        description="a deployment's record shapes, as module:Class (BaseFormatter subclasses); "
        "a top-level dataset_formatters in the config file is shared with the workers",
    )
    _formatters = field_validator("dataset_formatters")(formats.loadable)
    hub_datasets_allowed: list[str] = Field(
        default_factory=lambda: ["admins"],
        description="who may train on a Hub dataset (hf://org/name): 'admins', 'everyone', or "
        "tenant ids; [] turns Hub datasets off.  HF_ENDPOINT and HF_TOKEN say which Hub, as whom",
    )
    hub_datasets_dir: Path | None = Field(
        None,
        description="where Hub datasets are fetched and kept (shared storage when workers are "
        "elsewhere); default: hub-datasets beside files_dir",
    )

    def dataset_limits(self) -> Limits:
        return Limits(
            max_bytes=self.files_max_bytes,
            max_rows=self.dataset_max_rows,
            max_line_bytes=self.dataset_max_line_bytes,
            max_depth=self.dataset_max_depth,
        )

    metrics_owned_model_names: bool = Field(
        False,
        description="label metrics with the ids of tenants' own (fine-tuned) models; by default "
        "they read as their base, since metrics are public unless gateway.metrics_public is off",
    )
    metrics_port: int | None = Field(
        9150, ge=0, le=65535, description="HTTP port for /metrics; 0 picks one, null: off"
    )
