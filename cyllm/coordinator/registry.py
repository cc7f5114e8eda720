"""The worker pool: who is registered, who is healthy, who takes the next request.

A worker is healthy while its heartbeats keep arriving within ``heartbeat_timeout_s``.
Selection picks, among healthy workers that serve the model and have a free slot, the
one with the fewest outstanding requests; ties rotate (round-robin).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from cyllm.protocol import pb, rpc

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerEntry:
    info: pb.WorkerInfo
    channel: grpc.aio.Channel
    stub: rpc.WorkerStub
    last_heartbeat: float = field(default_factory=time.monotonic)
    outstanding: int = 0  # generations sent here and not yet finished
    tokens_generated: int = 0
    rank: int = 0  # for round-robin among equals

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def serves(self, model: str) -> bool:
        return any(m.id == model for m in self.info.models)


class WorkerRegistry:
    def __init__(self, heartbeat_timeout_s: float, clock=time.monotonic) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._clock = clock
        self._workers: dict[str, WorkerEntry] = {}
        self._ranks = itertools.count()

    async def register(self, info: pb.WorkerInfo) -> WorkerEntry:
        old = self._workers.get(info.worker_id)
        if old is not None and old.info.address == info.address:
            old.info = info
            old.last_heartbeat = self._clock()
            return old
        if old is not None:
            await old.channel.close()
        channel = grpc.aio.insecure_channel(info.address)
        entry = WorkerEntry(info, channel, rpc.WorkerStub(channel), self._clock(),
                            rank=next(self._ranks))
        self._workers[info.worker_id] = entry
        log.info("worker %s registered at %s serving %s", info.worker_id, info.address,
                 [m.id for m in info.models])
        return entry

    def heartbeat(self, worker_id: str, tokens_generated: int) -> bool:
        entry = self._workers.get(worker_id)
        if entry is None:
            return False
        entry.last_heartbeat = self._clock()
        entry.tokens_generated = tokens_generated
        return True

    async def deregister(self, worker_id: str) -> None:
        entry = self._workers.pop(worker_id, None)
        if entry is not None:
            log.info("worker %s deregistered", worker_id)
            await entry.channel.close()

    def healthy(self, entry: WorkerEntry) -> bool:
        return self._clock() - entry.last_heartbeat <= self.heartbeat_timeout_s

    def all(self) -> list[WorkerEntry]:
        return list(self._workers.values())

    def serving(self, model: str) -> list[WorkerEntry]:
        return [w for w in self._workers.values() if w.serves(model) and self.healthy(w)]

    def pick(self, model: str) -> WorkerEntry | None:
        free = [w for w in self.serving(model) if w.outstanding < w.info.capacity]
        if not free:
            return None
        best = min(free, key=lambda w: (w.outstanding, w.rank))
        best.rank = next(self._ranks)  # goes to the back among equals
        return best

    def models(self) -> list[pb.ModelInfo]:
        seen: dict[str, pb.ModelInfo] = {}
        for w in self._workers.values():
            if self.healthy(w):
                for m in w.info.models:
                    seen.setdefault(m.id, m)
        return sorted(seen.values(), key=lambda m: m.id)

    async def close(self) -> None:
        for entry in self._workers.values():
            await entry.channel.close()
        self._workers.clear()
