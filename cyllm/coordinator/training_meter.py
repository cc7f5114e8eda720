"""What a training job costs its owner, in the usage ledger, and the budget that stops it.

A run's device-seconds (wall time × its processes) are recorded every ``EVERY_S``
while it goes, every attempt's run counted; the job's end adds one request with its
trained tokens.  A job created under a budget (the gateway passes the caller's
``device_seconds_per_month``) carries it: it does not start, and a running one stops
within ``EVERY_S``, once the owner's month — every job of its, from the ledger — has
used it.  A ledger that cannot be written or read loses a row or a check (logged),
never a job.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from cyllm.coordinator.ledger import Ledger, period_bounds
from cyllm.protocol import pb
from cyllm.training.spec import TrainingSpec

log = logging.getLogger(__name__)
QUOTA_CODE = "insufficient_quota"  # the code of a 429 for a spent budget at the gateway


class Meter:
    EVERY_S = 30.0

    def __init__(self, ledger: Ledger | None, job: pb.TrainingJob, spec: TrainingSpec) -> None:
        self.ledger = ledger if job.owner else None
        self.owner, self.model, self.processes = job.owner, spec.base_model, max(1, spec.processes)
        self.cap = job.device_seconds_per_month
        self.last = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.EVERY_S

    async def record(self) -> None:
        """The device-seconds used since they were last recorded."""
        now = time.monotonic()
        seconds, self.last = (now - self.last) * self.processes, now
        if self.ledger is None:
            return
        row = pb.UsageRow(
            start=int(time.time()),
            subject=self.owner,
            model=self.model,
            route="fine_tuning",
            outcome="ok",
            device_seconds=seconds,
        )
        try:
            await self.ledger.add([row])
        except Exception:
            log.exception("a training run's device-seconds were not recorded")

    async def spent(self) -> str | None:
        """Why the job may not go on: the owner's month has used its budget; else None."""
        if self.ledger is None or self.cap <= 0:
            return None
        start, end = period_bounds("month", time.time())
        try:
            used = (await self.ledger.spent(self.owner, start)).device_seconds
        except Exception:
            log.exception("a training job's budget could not be checked")
            return None
        if used < self.cap:
            return None
        reset = dt.datetime.fromtimestamp(end, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return (
            f"budget exceeded: its owner's {self.cap:g} training device-seconds per month are "
            f"spent ({used:.0f}); it resets at {reset}"
        )


async def record_end(ledger: Ledger | None, job: pb.TrainingJob) -> None:
    """The job in the ledger when it ends: one request and its trained tokens."""
    if ledger is None or not job.owner:
        return
    spec = TrainingSpec.model_validate_json(job.spec_json)
    row = pb.UsageRow(
        start=job.finished_at,
        subject=job.owner,
        model=spec.base_model,
        route="fine_tuning",
        outcome="ok" if job.state == "succeeded" else "error",
        requests=1,
        trained_tokens=job.trained_tokens,
    )
    try:
        await ledger.add([row])
    except Exception:
        log.exception("training job %s: its usage was not recorded", job.id)
