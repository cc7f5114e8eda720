"""The worker pool's rules, shared by every backend: what is known of a worker, when it
is healthy, and what a registration or a heartbeat changes.  Which healthy worker takes
the next request is ``routing.py``.

A worker is healthy while (1) its heartbeats arrive within ``heartbeat_timeout_s``
and (2) it makes progress: a worker with work in flight whose generated-token counter
has not moved for ``progress_timeout_s`` is reported unhealthy, because an engine can
hang while its process still answers heartbeats.
"""

from __future__ import annotations

from dataclasses import dataclass

from cyllm.protocol import pb


@dataclass
class WorkerRecord:
    info: pb.WorkerInfo
    last_heartbeat: float
    outstanding: int = 0  # generations sent there and not finished (all coordinators)
    running: int = 0  # as the worker last reported
    tokens: int = 0  # the worker's monotonic generated-token counter
    progress_at: float = 0.0  # when ``tokens`` last moved (or the worker was idle)

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def training_busy(self) -> bool:
        """Running a training job on the device it serves from (and not sharing it)."""
        return bool(self.info.training_job) and not self.info.training_shares_device

    def serves(self, model: str) -> bool:
        return any(m.id == model for m in self.info.models)

    def beat(self, now: float, running: int, tokens: int) -> None:
        if progressed(self.tokens, tokens, running):
            self.progress_at = now
        self.last_heartbeat, self.running, self.tokens = now, running, tokens


def progressed(old_tokens: int, tokens: int, running: int) -> bool:
    """A heartbeat shows progress when the token counter moved, or when there is nothing
    to make progress on.  (The Redis backend applies this rule inside its heartbeat
    script, atomically with the write; a contract test checks the two agree.)"""
    return tokens != old_tokens or running == 0


def keeps_outstanding(old: pb.WorkerInfo | None, new: pb.WorkerInfo) -> bool:
    """A worker registering again at the same address is the same process (its models
    changed, or a coordinator forgot it): the generations sent to it are still running,
    so its outstanding count stays.  A new address is a new process: it starts at zero."""
    return old is not None and old.address == new.address


@dataclass(frozen=True)
class HealthRules:
    heartbeat_timeout_s: float
    progress_timeout_s: float

    def check(self, w: WorkerRecord, now: float) -> str:
        """Empty when healthy, else why not."""
        silent = now - w.last_heartbeat
        if silent > self.heartbeat_timeout_s:
            return f"no heartbeat for {silent:.1f}s"
        stalled = now - w.progress_at
        if w.running > 0 and stalled > self.progress_timeout_s:
            return f"{w.running} generation(s) in flight but no token for {stalled:.1f}s"
        return ""
