"""Worker-pool rules shared by every backend: when a worker is healthy, and which of
the healthy ones takes the next request (the routing strategy).

A worker is healthy while (1) its heartbeats arrive within ``heartbeat_timeout_s``
and (2) it makes progress: a worker with work in flight whose generated-token counter
has not moved for ``progress_timeout_s`` is reported unhealthy, because an engine can
hang while its process still answers heartbeats.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Literal

from cyllm.protocol import pb

Strategy = Literal["least_outstanding", "weighted_round_robin", "prefix_affinity"]


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


@dataclass
class Router:
    """Picks a worker among healthy ones with a free slot.

    - ``least_outstanding``: fewest in-flight requests; ties go round-robin.
    - ``weighted_round_robin``: smooth weighted round-robin (as nginx) over
      ``WorkerInfo.weight``.
    - ``prefix_affinity``: requests with the same conversation prefix go to the same
      worker (rendezvous hashing, so a worker leaving moves only its own share), to reuse
      its KV cache; without a prefix, least outstanding.
    """

    strategy: Strategy = "least_outstanding"
    _current: dict[str, int] = field(default_factory=dict)
    _turn: itertools.count = field(default_factory=itertools.count)
    _last_used: dict[str, int] = field(default_factory=dict)

    def choose(self, free: list[WorkerRecord], affinity: str = "") -> WorkerRecord | None:
        if not free:
            return None
        if self.strategy == "weighted_round_robin":
            chosen = self._smooth_wrr(free)
        elif self.strategy == "prefix_affinity" and affinity:
            chosen = max(free, key=lambda w: _rendezvous(affinity, w.worker_id))
        else:
            chosen = min(free, key=lambda w: (w.outstanding, self._last_used.get(w.worker_id, -1)))
        self._last_used[chosen.worker_id] = next(self._turn)
        return chosen

    def _smooth_wrr(self, free: list[WorkerRecord]) -> WorkerRecord:
        total = 0
        for w in free:
            weight = max(1, w.info.weight)
            self._current[w.worker_id] = self._current.get(w.worker_id, 0) + weight
            total += weight
        chosen = max(free, key=lambda w: self._current[w.worker_id])
        self._current[chosen.worker_id] -= total
        return chosen


def _rendezvous(key: str, worker_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\0{worker_id}".encode()).digest()[:8], "big")


def affinity_key(request: pb.GenerateRequest, chars: int = 256) -> str:
    """The conversation prefix: the first messages (or prompt) up to ``chars`` characters."""
    if request.WhichOneof("input") == "messages":
        text = "\n".join(f"{m.role}:{m.content}" for m in request.messages.messages)
    else:
        text = request.prompt
    return f"{request.model}\0{text[:chars]}"
