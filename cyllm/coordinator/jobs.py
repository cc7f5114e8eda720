"""Where training jobs and uploaded files are kept: ``JobStore``.

A job is a ``pb.TrainingJob`` record, an append-only list of its events (numbered from
1), a place in the FIFO of queued jobs, and — while it runs — a lease held by the
coordinator that streams it from a worker.  A lease that runs out (that coordinator
died) puts the job back in the queue, to resume from its last checkpoint.  Cancelling
sets a flag the running coordinator watches, so a cancel may arrive at any coordinator.

``MemoryJobStore`` keeps all of it in the process (the embedded default);
``RedisJobStore`` (``redis_jobs.py``) shares it between coordinators.
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict, deque

from cyllm.protocol import pb

TERMINAL = ("succeeded", "failed", "cancelled")


class JobStore(abc.ABC):
    async def start(self) -> None:
        """Connect (a no-op in memory)."""

    async def close(self) -> None:
        """Release connections."""

    # -- jobs
    @abc.abstractmethod
    async def put(self, job: pb.TrainingJob) -> None:
        """Create or overwrite the record (the cancel flag is kept apart)."""

    @abc.abstractmethod
    async def get(self, job_id: str) -> pb.TrainingJob | None: ...

    @abc.abstractmethod
    async def page(self, limit: int, after: str = "") -> tuple[list[pb.TrainingJob], bool]:
        """Newest first; ``after`` a job id: those created before it."""

    @abc.abstractmethod
    async def append_event(self, job_id: str, event: pb.TrainingEvent) -> int:
        """Store the event; return its sequence number (also set on ``event``)."""

    @abc.abstractmethod
    async def events(self, job_id: str, after_seq: int = 0, limit: int = 0) -> list[pb.TrainingEvent]: ...

    @abc.abstractmethod
    async def request_cancel(self, job_id: str) -> None: ...

    @abc.abstractmethod
    async def cancel_requested(self, job_id: str) -> bool: ...

    # -- the queue of jobs waiting for a worker, and leases on running ones
    @abc.abstractmethod
    async def enqueue(self, job_id: str) -> None: ...

    @abc.abstractmethod
    async def dequeue(self, job_id: str) -> bool:
        """Remove a queued job (cancelled before it ran); False if it was not queued."""

    @abc.abstractmethod
    async def queued(self) -> list[str]:
        """Queued job ids, oldest first."""

    @abc.abstractmethod
    async def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Take a queued job for ``owner`` (one coordinator wins); False if gone."""

    @abc.abstractmethod
    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease; False when it was lost."""

    @abc.abstractmethod
    async def release(self, job_id: str) -> None:
        """Drop the lease (the job ended or went back to the queue)."""

    @abc.abstractmethod
    async def expired(self) -> list[str]:
        """Running jobs whose lease ran out (their coordinator is gone)."""

    # -- files
    @abc.abstractmethod
    async def put_file(self, info: pb.FileInfo) -> None: ...

    @abc.abstractmethod
    async def get_file(self, file_id: str) -> pb.FileInfo | None: ...

    @abc.abstractmethod
    async def files(self) -> list[pb.FileInfo]: ...

    @abc.abstractmethod
    async def delete_file(self, file_id: str) -> bool: ...

    # -- stored responses (/v1/responses), each until its expiry (wall-clock seconds)
    @abc.abstractmethod
    async def put_response(self, response: pb.StoredResponse, ttl_s: float, keep: int) -> None:
        """Store it for ``ttl_s``; its owner keeps at most ``keep`` (the oldest go)."""

    @abc.abstractmethod
    async def get_response(self, response_id: str) -> pb.StoredResponse | None: ...

    @abc.abstractmethod
    async def delete_response(self, response_id: str) -> bool: ...

    # -- batches (/v1/batches): the record, a runner's lease, the results of its lines
    @abc.abstractmethod
    async def put_batch(self, batch: pb.Batch) -> None: ...

    @abc.abstractmethod
    async def get_batch(self, batch_id: str) -> pb.Batch | None: ...

    @abc.abstractmethod
    async def batches(self, open_only: bool = False) -> list[pb.Batch]:
        """Oldest first; ``open_only``: those not yet in a final state."""

    @abc.abstractmethod
    async def claim_batch(self, batch_id: str, runner: str, lease_s: float) -> bool:
        """Take the batch's lease for ``runner`` (or renew it); False while another holds it."""

    @abc.abstractmethod
    async def release_batch(self, batch_id: str, runner: str) -> None: ...

    @abc.abstractmethod
    async def add_batch_results(self, batch_id: str, results: list[pb.BatchResult]) -> list[pb.BatchResult]:
        """Keep each line's first result; return those that were new."""

    @abc.abstractmethod
    async def batch_done(self, batch_id: str) -> list[int]:
        """The lines that have a result."""

    @abc.abstractmethod
    async def batch_results(self, batch_id: str, start: int, stop: int) -> list[pb.BatchResult]:
        """The results of lines ``start`` to ``stop - 1``, by line."""

    @abc.abstractmethod
    async def drop_batch_results(self, batch_id: str) -> None: ...

    @abc.abstractmethod
    async def cancel_batch(self, batch_id: str) -> None:
        """Set the batch's cancel flag (kept apart from its record, as a job's is)."""

    @abc.abstractmethod
    async def batch_cancelled(self, batch_id: str) -> bool: ...


FINAL_BATCH = ("completed", "failed", "expired", "cancelled")
MAX_MEMORY_RESPONSES = 10_000  # in memory, the oldest go first past this many


class MemoryJobStore(JobStore):
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._jobs: dict[str, pb.TrainingJob] = {}
        self._events: dict[str, list[pb.TrainingEvent]] = {}
        self._cancel: set[str] = set()
        self._queue: deque[str] = deque()
        self._leases: dict[str, tuple[str, float]] = {}
        self._files: dict[str, pb.FileInfo] = {}
        self._responses: OrderedDict[str, tuple[pb.StoredResponse, float]] = OrderedDict()
        self._batches: dict[str, pb.Batch] = {}
        self._batch_leases: dict[str, tuple[str, float]] = {}
        self._batch_results: dict[str, dict[int, pb.BatchResult]] = {}
        self._batch_cancels: set[str] = set()

    async def put(self, job: pb.TrainingJob) -> None:
        copy = pb.TrainingJob()
        copy.CopyFrom(job)
        self._jobs[job.id] = copy

    async def get(self, job_id: str) -> pb.TrainingJob | None:
        return self._read(job_id) if job_id in self._jobs else None

    def _read(self, job_id: str) -> pb.TrainingJob:
        out = pb.TrainingJob()
        out.CopyFrom(self._jobs[job_id])
        out.cancel_requested = job_id in self._cancel
        return out

    async def page(self, limit: int, after: str = "") -> tuple[list[pb.TrainingJob], bool]:
        ids = sorted(self._jobs, key=lambda i: (self._jobs[i].created_at, i), reverse=True)
        if after:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        return [self._read(i) for i in ids[:limit]], len(ids) > limit

    async def append_event(self, job_id: str, event: pb.TrainingEvent) -> int:
        events = self._events.setdefault(job_id, [])
        event.seq = len(events) + 1
        copy = pb.TrainingEvent()
        copy.CopyFrom(event)
        events.append(copy)
        return event.seq

    async def events(self, job_id: str, after_seq: int = 0, limit: int = 0) -> list[pb.TrainingEvent]:
        out = self._events.get(job_id, [])[after_seq:]
        return out[:limit] if limit else list(out)

    async def request_cancel(self, job_id: str) -> None:
        self._cancel.add(job_id)

    async def cancel_requested(self, job_id: str) -> bool:
        return job_id in self._cancel

    async def enqueue(self, job_id: str) -> None:
        if job_id not in self._queue:
            self._queue.append(job_id)

    async def dequeue(self, job_id: str) -> bool:
        if job_id in self._queue:
            self._queue.remove(job_id)
            return True
        return False

    async def queued(self) -> list[str]:
        return list(self._queue)

    async def claim(self, job_id: str, owner: str, lease_s: float) -> bool:
        if not await self.dequeue(job_id):
            return False
        self._leases[job_id] = (owner, self.clock() + lease_s)
        return True

    async def renew(self, job_id: str, owner: str, lease_s: float) -> bool:
        held = self._leases.get(job_id)
        if held is None or held[0] != owner:
            return False
        self._leases[job_id] = (owner, self.clock() + lease_s)
        return True

    async def release(self, job_id: str) -> None:
        self._leases.pop(job_id, None)

    async def expired(self) -> list[str]:
        now = self.clock()
        return [j for j, (_, until) in self._leases.items() if until < now]

    async def put_file(self, info: pb.FileInfo) -> None:
        self._files[info.id] = info

    async def get_file(self, file_id: str) -> pb.FileInfo | None:
        return self._files.get(file_id)

    async def files(self) -> list[pb.FileInfo]:
        return sorted(self._files.values(), key=lambda f: (f.created_at, f.id))

    async def delete_file(self, file_id: str) -> bool:
        return self._files.pop(file_id, None) is not None

    async def put_response(self, response: pb.StoredResponse, ttl_s: float, keep: int) -> None:
        self._responses[response.id] = (response, time.time() + ttl_s)
        self._responses.move_to_end(response.id)
        mine = [k for k, (r, _) in self._responses.items() if r.owner == response.owner]
        for old in mine[: max(0, len(mine) - keep)]:
            del self._responses[old]
        while len(self._responses) > MAX_MEMORY_RESPONSES:
            self._responses.popitem(last=False)

    async def get_response(self, response_id: str) -> pb.StoredResponse | None:
        found = self._responses.get(response_id)
        return found[0] if found is not None and found[1] > time.time() else None

    async def delete_response(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None

    async def put_batch(self, batch: pb.Batch) -> None:
        copy = pb.Batch()
        copy.CopyFrom(batch)
        self._batches[batch.id] = copy

    async def get_batch(self, batch_id: str) -> pb.Batch | None:
        found = self._batches.get(batch_id)
        if found is None:
            return None
        out = pb.Batch()
        out.CopyFrom(found)
        return out

    async def batches(self, open_only: bool = False) -> list[pb.Batch]:
        found = [b for b in self._batches.values() if not open_only or b.status not in FINAL_BATCH]
        return sorted(found, key=lambda b: (b.created_at, b.id))

    async def claim_batch(self, batch_id: str, runner: str, lease_s: float) -> bool:
        held = self._batch_leases.get(batch_id)
        if held is not None and held[0] != runner and held[1] > self.clock():
            return False
        self._batch_leases[batch_id] = (runner, self.clock() + lease_s)
        return True

    async def release_batch(self, batch_id: str, runner: str) -> None:
        if self._batch_leases.get(batch_id, ("",))[0] == runner:
            del self._batch_leases[batch_id]

    async def add_batch_results(self, batch_id: str, results: list[pb.BatchResult]) -> list[pb.BatchResult]:
        kept = self._batch_results.setdefault(batch_id, {})
        new = [r for r in results if r.index not in kept]
        for r in new:
            kept[r.index] = r
        return new

    async def batch_done(self, batch_id: str) -> list[int]:
        return sorted(self._batch_results.get(batch_id, {}))

    async def batch_results(self, batch_id: str, start: int, stop: int) -> list[pb.BatchResult]:
        kept = self._batch_results.get(batch_id, {})
        return [kept[i] for i in sorted(kept) if start <= i < stop]

    async def drop_batch_results(self, batch_id: str) -> None:
        self._batch_results.pop(batch_id, None)

    async def cancel_batch(self, batch_id: str) -> None:
        self._batch_cancels.add(batch_id)

    async def batch_cancelled(self, batch_id: str) -> bool:
        return batch_id in self._batch_cancels
