"""Routing: which of the healthy workers with a free slot takes the next request."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Literal

from cyllm.coordinator.pool import WorkerRecord
from cyllm.protocol import pb

Strategy = Literal["least_outstanding", "weighted_round_robin", "prefix_affinity"]


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
    elif request.WhichOneof("input") == "prompt_token_ids":
        text = ",".join(map(str, request.prompt_token_ids.ids[:chars]))
    else:
        text = request.prompt
    return f"{request.model}\0{text[:chars]}"
