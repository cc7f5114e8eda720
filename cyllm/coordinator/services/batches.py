"""``Batches``: OpenAI's Batch API (``/v1/batches``) as the coordinator keeps it.

A batch is its owner's, like a file: another tenant's id reads as a missing one.  Its
record, the results of its lines and the lease of the gateway running it live in the
job store (memory, SQLite or Redis), so a batch survives the restart of any process:

- ``CreateBatch`` checks the input file through (``batch_input.py``) and stores the
  batch ``in_progress``, with whom its lines run as (the gateway's identity of its
  creator: its scopes and model allow-list hold for every line);
- a gateway ``ClaimBatch``es the oldest open batch nobody holds, under a lease, with
  the lines that already have a result, and runs the others (``gateway/batch_runner``);
- each ``ReportBatch`` keeps the first result of each line (a line run twice, by a
  runner that lost its lease, is counted once), renews the lease, and tells the runner
  to stop when the batch was cancelled or expired;
- when every line has a result, or the batch is cancelled or expires, it is finalized:
  its output file (the lines that succeeded, in input order) and its error file (those
  that failed, and on expiry those never run, as ``batch_expired``) become the owner's
  ``batch_output`` files, and the results are dropped from the store.

Only a caller without tenant metadata (a gateway's own calls, on the authenticated
internal plane) may claim and report.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import uuid
from pathlib import Path

from cyllm import errors
from cyllm.coordinator.batch_input import ENDPOINTS, read_requests, requests
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.jobs import FINAL_BATCH, JobStore
from cyllm.paths import is_id
from cyllm.protocol import pb, rpc
from cyllm.protocol.tenant import OPERATOR, Tenant

WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
MAX_WINDOW_H = 168
PAGE = 1000  # results read at a time while finalizing
MAX_META_BYTES = 16 * 600


class BatchService(rpc.BatchesServicer):
    def __init__(self, store: JobStore, files: FileStore, max_open_per_tenant: int = 16) -> None:
        self.store, self.files, self.max_open = store, files, max_open_per_tenant

    async def CreateBatch(self, request: pb.CreateBatchRequest, context) -> pb.Batch:
        tenant = Tenant.of(context)
        if request.endpoint not in ENDPOINTS:
            raise errors.InvalidRequest(
                f"endpoint must be one of {', '.join(ENDPOINTS)}, not {request.endpoint[:80]!r}",
                param="endpoint",
            )
        window = WINDOW.match(request.completion_window)
        if window is None or int(window[1]) > MAX_WINDOW_H:
            raise errors.InvalidRequest(
                f"completion_window is hours, as '24h': 1h to {MAX_WINDOW_H}h", param="completion_window"
            )
        caller = json.loads(request.caller_json or "{}")
        if (
            caller.get("subject", tenant.subject) != tenant.subject
            or len(request.metadata_json) > MAX_META_BYTES
        ):
            raise errors.InvalidRequest("the batch's caller or metadata does not hold", param="metadata")
        mine = [b for b in await self.store.batches(open_only=True) if b.owner == tenant.subject]
        if len(mine) >= self.max_open:
            raise errors.RateLimited(
                f"this caller has {len(mine)} batches running, the most at once "
                "(coordinator.batch_max_open_per_tenant); cancel one or wait",
                retry_after=60,
                headers={},
            )
        info = await self.files.get(request.input_file_id, tenant, param="input_file_id")
        if info.purpose != "batch":
            raise errors.InvalidRequest(
                f"file {info.id!r} was uploaded for {info.purpose!r}, not for 'batch'", param="input_file_id"
            )
        total = await asyncio.to_thread(
            read_requests, Path(info.path), self.files.batch_max_requests, request.endpoint
        )
        now = int(time.time())
        batch = pb.Batch(
            id=f"batch_{uuid.uuid4().hex}",
            owner=tenant.subject,
            endpoint=request.endpoint,
            input_file_id=info.id,
            completion_window=request.completion_window,
            status="in_progress",
            created_at=now,
            in_progress_at=now,
            expires_at=now + int(window[1]) * 3600,
            total=total,
            metadata_json=request.metadata_json,
            caller_json=request.caller_json,
        )
        await self.store.put_batch(batch)
        return batch

    async def GetBatch(self, request: pb.BatchRequest, context) -> pb.Batch:
        return await self._owned(request.id, Tenant.of(context))

    async def ListBatches(self, request: pb.ListBatchesRequest, context) -> pb.ListBatchesResponse:
        tenant = Tenant.of(context)
        mine = [b for b in reversed(await self.store.batches()) if tenant.owns(b.owner)]
        if request.after:
            ids = [b.id for b in mine]
            mine = mine[ids.index(request.after) + 1 :] if request.after in ids else []
        limit = request.limit or 20
        return pb.ListBatchesResponse(batches=mine[:limit], has_more=len(mine) > limit)

    async def CancelBatch(self, request: pb.BatchRequest, context) -> pb.Batch:
        batch = await self._owned(request.id, Tenant.of(context))
        if batch.status in FINAL_BATCH or batch.status == "cancelling":
            return batch
        batch.status, batch.cancelling_at = "cancelling", int(time.time())
        await self.store.put_batch(batch)
        return batch  # its runner stops at its next report; one not running ends at the next claim

    async def ClaimBatch(self, request: pb.ClaimBatchRequest, context) -> pb.ClaimedBatch:
        _runner_only(context)
        lease_s = min(max(request.lease_s, 5.0), 600.0)
        for batch in await self.store.batches(open_only=True):
            if not await self.store.claim_batch(batch.id, request.runner, lease_s):
                continue
            if batch.status == "in_progress" and time.time() < batch.expires_at:
                return pb.ClaimedBatch(batch=batch, done=await self.store.batch_done(batch.id))
            await self._finalize(batch, _ending(batch))  # cancelled, expired, or finalizing again
            await self.store.release_batch(batch.id, request.runner)
        return pb.ClaimedBatch()

    async def ReportBatch(self, request: pb.BatchReport, context) -> pb.BatchReportReply:
        _runner_only(context)
        batch = await self.store.get_batch(request.id) if is_id(request.id) else None
        if batch is None or batch.status in FINAL_BATCH:
            return pb.BatchReportReply(stop=True)
        if not await self.store.claim_batch(batch.id, request.runner, min(max(request.lease_s, 5.0), 600.0)):
            return pb.BatchReportReply(stop=True)  # another runner took it over
        new = await self.store.add_batch_results(batch.id, list(request.results))
        if new:
            batch = await self.store.get_batch(batch.id) or batch  # cancelled meanwhile?
            for r in new:
                batch.failed += r.failed
                batch.completed += not r.failed
                batch.input_tokens += r.input_tokens
                batch.output_tokens += r.output_tokens
            await self.store.put_batch(batch)
        if request.failure:
            await self._finalize(
                batch, "failed", [{"code": "batch_failed", "message": request.failure[:500]}]
            )
        elif batch.status != "in_progress" or time.time() >= batch.expires_at:
            await self._finalize(batch, _ending(batch))
        elif request.finished or batch.completed + batch.failed >= batch.total:
            await self._finalize(batch, "completed")
        else:
            if request.release:
                await self.store.release_batch(batch.id, request.runner)
            return pb.BatchReportReply()
        await self.store.release_batch(batch.id, request.runner)
        return pb.BatchReportReply(stop=True)

    async def _owned(self, batch_id: str, tenant: Tenant) -> pb.Batch:
        found = await self.store.get_batch(batch_id) if is_id(batch_id) else None
        if found is None or not tenant.owns(found.owner):
            raise errors.NotFound(f"batch {batch_id[:140]!r} does not exist", param="batch_id")
        return found

    async def _finalize(self, batch: pb.Batch, status: str, failure: list[dict] | None = None) -> None:
        """Write the output and error files, then the final state (a batch whose
        coordinator died half-way is finalized again by the next claim)."""
        now = int(time.time())
        batch.status, batch.finalizing_at = "finalizing", now
        await self.store.put_batch(batch)
        unrun = "batch_expired" if status == "expired" else ""
        lines: list[tuple[int, str]] = []
        source = await self.files.store.get_file(batch.input_file_id) if unrun else None
        if source is not None:
            try:
                lines = await asyncio.to_thread(requests, Path(source.path))
            except OSError:
                pass  # deleted meanwhile: its unrun lines go unnamed
        out = {kind: self.files.new(f"{batch.id}_{kind}.jsonl") for kind in ("output", "error")}
        written = {"output": 0, "error": 0}
        for start in range(0, batch.total, PAGE):
            got = {r.index: r for r in await self.store.batch_results(batch.id, start, start + PAGE)}
            page: dict[str, list[bytes]] = {"output": [], "error": []}
            for index in range(start, min(start + PAGE, batch.total)):
                found = got.get(index)
                if found is not None:
                    page["error" if found.failed else "output"].append(found.line)
                elif unrun and index < len(lines):
                    page["error"].append(_unrun(lines[index][1], unrun))
            for kind, kept in page.items():
                if kept:
                    await asyncio.to_thread(_append, out[kind], kept)
                    written[kind] += len(kept)
        for kind, path in out.items():
            if written[kind]:
                info = await self.files.register(path, batch.owner, "batch_output")
                setattr(batch, f"{kind}_file_id", info.id)
            else:
                shutil.rmtree(path.parent, ignore_errors=True)
        if failure:
            batch.errors_json = json.dumps(failure)
        batch.status = status
        setattr(batch, f"{status}_at", int(time.time()))
        await self.store.put_batch(batch)
        await self.store.drop_batch_results(batch.id)


def _ending(batch: pb.Batch) -> str:
    """The final state of an open batch that stops (or was being finalized when its
    coordinator died)."""
    if batch.cancelling_at:
        return "cancelled"
    return "expired" if time.time() >= batch.expires_at else "completed"


def _unrun(custom_id: str, code: str) -> bytes:
    error = {"code": code, "message": "this request was not run before the batch's completion window ended"}
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None, "error": error}
    return json.dumps(line).encode()


def _append(path: Path, kept: list[bytes]) -> None:
    with open(path, "ab") as out:
        out.writelines(line.rstrip(b"\n") + b"\n" for line in kept)


def _runner_only(context) -> None:
    if Tenant.of(context) != OPERATOR:
        raise errors.Forbidden("only a gateway's own calls run batches")
