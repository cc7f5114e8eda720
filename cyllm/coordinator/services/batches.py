"""``Batches``: OpenAI's Batch API (``/v1/batches``) as the coordinator keeps it.

A batch is its owner's, like a file: another tenant's id reads as a missing one.  Its
record, the results of its lines, its cancel flag and the lease of whoever works on it
live in the job store (memory, SQLite or Redis), so a batch survives the restart of
any process:

- ``CreateBatch`` checks the input file through (``batch_input.py``) and stores the
  batch ``in_progress``, with whom its lines run as (the gateway's identity of its
  creator: its scopes and model allow-list hold for every line);
- a gateway ``ClaimBatch``es the open batch that was run least recently and that nobody
  holds, under a lease, with the lines that already have a result, runs the others for
  a while (``gateway/batch_runner``) and gives it back: batches take turns, so one
  tenant's slow batch never holds the others back;
- each ``ReportBatch`` keeps the first result of each line (a line run twice, by a
  runner that lost its lease, is counted once), renews the lease, and tells the runner
  to stop when the batch was cancelled or expired;
- a batch whose lines are all done, or that is cancelled, expires or fails, is
  finalized in the background under the coordinator's own lease (a coordinator that
  dies meanwhile lets it lapse; the next claim finalizes it again): its output file
  (the lines that succeeded, in input order) and its error file (those that failed,
  and on expiry those never run, as ``batch_expired``) become the owner's
  ``batch_output`` files, its counts are recomputed from its results, and the results
  are dropped from the store.

Only a caller without tenant metadata (a gateway's own calls, on the authenticated
internal plane) may claim and report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import time
import uuid
from pathlib import Path

from cyllm import errors
from cyllm.coordinator.batch_input import ENDPOINTS, MAX_META_BYTES, read_requests, requests
from cyllm.coordinator.files import FileStore
from cyllm.coordinator.jobs import FINAL_BATCH, JobStore
from cyllm.paths import is_id
from cyllm.protocol import pb, rpc
from cyllm.protocol.tenant import OPERATOR, Tenant

log = logging.getLogger(__name__)

WINDOW = re.compile(r"^([1-9][0-9]{0,2})h$")
MAX_WINDOW_H = 168
PAGE = 1000  # results read at a time while finalizing
FINALIZE_LEASE_S = 600.0


class BatchService(rpc.BatchesServicer):
    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        max_open_per_tenant: int = 16,
        max_output_bytes: int = 256 << 20,
        coordinator_id: str = "coordinator",
    ) -> None:
        self.store, self.files = store, files
        self.max_open, self.max_output_bytes = max_open_per_tenant, max_output_bytes
        self.finalizer = f"finalizer-{coordinator_id}"
        self._finalizing: dict[str, asyncio.Task[None]] = {}

    async def close(self) -> None:
        """Stop finalizing (a batch left half-way is finalized again after its lease)."""
        for task in list(self._finalizing.values()):
            task.cancel()
        await asyncio.gather(*self._finalizing.values(), return_exceptions=True)

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
        if len(request.metadata_json.encode()) > MAX_META_BYTES:
            raise errors.InvalidRequest(
                f"metadata is at most {MAX_META_BYTES} bytes as JSON", param="metadata"
            )
        caller = json.loads(request.caller_json or "{}")
        if caller.get("subject", tenant.subject) != tenant.subject:
            raise errors.Forbidden("a batch runs as the caller that makes it")
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
        page = [await self._shown(b) for b in mine[:limit]]
        return pb.ListBatchesResponse(batches=page, has_more=len(mine) > limit)

    async def CancelBatch(self, request: pb.BatchRequest, context) -> pb.Batch:
        batch = await self._owned(request.id, Tenant.of(context))
        if batch.status == "in_progress":
            # A flag of its own, never a write of the record: the runner's reports write
            # that.  Its runner stops at its next report; one nobody runs ends at the
            # next claim.
            await self.store.cancel_batch(batch.id)
            return await self._shown(batch)
        return batch

    async def ClaimBatch(self, request: pb.ClaimBatchRequest, context) -> pb.ClaimedBatch:
        _runner_only(context)
        lease_s = min(max(request.lease_s, 5.0), 600.0)
        open_batches = await self.store.batches(open_only=True)
        for batch in sorted(open_batches, key=lambda b: (b.claimed_at, b.created_at, b.id)):
            try:
                if batch.status != "in_progress" or await self._stopping(batch):
                    await self._finish_later(batch)
                elif await self.store.claim_batch(batch.id, request.runner, lease_s):
                    fresh = await self.store.get_batch(batch.id) or batch
                    fresh.claimed_at = int(time.time() * 1000)
                    await self.store.put_batch(fresh)
                    return pb.ClaimedBatch(batch=fresh, done=await self.store.batch_done(batch.id))
            except errors.CyllmError as exc:  # one batch's trouble never blocks the others
                log.warning("batch %s: %s", batch.id, exc)
        return pb.ClaimedBatch()

    async def ReportBatch(self, request: pb.BatchReport, context) -> pb.BatchReportReply:
        _runner_only(context)
        batch = await self.store.get_batch(request.id) if is_id(request.id) else None
        if batch is None or batch.status != "in_progress":
            return pb.BatchReportReply(stop=True)
        if not await self.store.claim_batch(batch.id, request.runner, min(max(request.lease_s, 5.0), 600.0)):
            return pb.BatchReportReply(stop=True)  # another runner took it over
        results, size = [], batch.output_bytes  # the cap counts this report's lines as they come
        for r in request.results:
            results.append(self._bounded(size, r))
            size += len(results[-1].line)
        for r in await self.store.add_batch_results(batch.id, results):
            batch.failed += r.failed
            batch.completed += not r.failed
            batch.input_tokens += r.input_tokens
            batch.output_tokens += r.output_tokens
            batch.output_bytes += len(r.line)
        if request.failure:
            batch.errors_json = json.dumps([{"code": "batch_failed", "message": request.failure[:500]}])
        ends = (
            request.failure
            or request.finished
            or batch.completed + batch.failed >= batch.total
            or await self._stopping(batch)
        )
        if ends:
            batch.status, batch.finalizing_at = "finalizing", int(time.time())
        await self.store.put_batch(batch)
        if ends or request.release:
            await self.store.release_batch(batch.id, request.runner)
        if ends:
            await self._finish_later(batch)
        return pb.BatchReportReply(stop=bool(ends))

    def _bounded(self, size: int, result: pb.BatchResult) -> pb.BatchResult:
        """The result, or in its place a failure once the batch's output (``size`` so far)
        is at its cap."""
        if size + len(result.line) <= self.max_output_bytes:
            return result
        custom_id = json.loads(result.line).get("custom_id", "")
        error = {
            "code": "batch_output_too_large",
            "message": f"the batch's results are over {self.max_output_bytes} bytes "
            "(coordinator.batch_max_output_bytes)",
        }
        line = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": custom_id,
            "response": None,
            "error": error,
        }
        return pb.BatchResult(index=result.index, failed=True, line=json.dumps(line).encode())

    async def _stopping(self, batch: pb.Batch) -> bool:
        return time.time() >= batch.expires_at or await self.store.batch_cancelled(batch.id)

    async def _owned(self, batch_id: str, tenant: Tenant) -> pb.Batch:
        found = await self.store.get_batch(batch_id) if is_id(batch_id) else None
        if found is None or not tenant.owns(found.owner):
            raise errors.NotFound(f"batch {batch_id[:140]!r} does not exist", param="batch_id")
        return await self._shown(found)

    async def _shown(self, batch: pb.Batch) -> pb.Batch:
        """The batch as its owner sees it: ``cancelling`` once asked, until it ends."""
        if batch.status in ("in_progress", "finalizing") and await self.store.batch_cancelled(batch.id):
            batch.status = "cancelling" if batch.status == "in_progress" else batch.status
            batch.cancelling_at = batch.cancelling_at or int(time.time())
        return batch

    async def _finish_later(self, batch: pb.Batch) -> None:
        """Finalize the batch in the background, under this coordinator's lease (unless
        a runner holds it, or this coordinator is at it already)."""
        if batch.id in self._finalizing:
            return
        if not await self.store.claim_batch(batch.id, self.finalizer, FINALIZE_LEASE_S):
            return
        task = asyncio.create_task(self._finalize(batch.id))
        self._finalizing[batch.id] = task
        task.add_done_callback(lambda _: self._finalizing.pop(batch.id, None))

    async def _finalize(self, batch_id: str) -> None:
        """Write the output and error files, then the final state."""
        try:
            batch = await self.store.get_batch(batch_id)
            if batch is None or batch.status in FINAL_BATCH:
                return
            cancelled = await self.store.batch_cancelled(batch_id)
            if batch.status != "finalizing":
                batch.status, batch.finalizing_at = "finalizing", int(time.time())
                await self.store.put_batch(batch)
            done = set(await self.store.batch_done(batch_id))
            expired = len(done) < batch.total and time.time() >= batch.expires_at
            status = (
                "failed"
                if batch.errors_json
                else "cancelled"
                if cancelled
                else "expired"
                if expired
                else "completed"
            )
            # Lines with no result: named in the error file, unless the batch was cancelled.
            unrun = {"expired": "batch_expired", "completed": "not_run", "failed": "batch_failed"}.get(status)
            lines: list[tuple[int, str]] = []
            source = await self.files.store.get_file(batch.input_file_id)
            if unrun and len(done) < batch.total and source is not None:
                try:
                    lines = await asyncio.to_thread(requests, Path(source.path))
                except OSError:
                    pass  # deleted meanwhile: its unrun lines go unnamed
            out = {kind: self.files.new(f"{batch.id}_{kind}.jsonl") for kind in ("output", "error")}
            written = {"output": 0, "error": 0}
            batch.completed = batch.failed = batch.input_tokens = batch.output_tokens = 0
            for start in range(0, batch.total, PAGE):
                got = {r.index: r for r in await self.store.batch_results(batch.id, start, start + PAGE)}
                page: dict[str, list[bytes]] = {"output": [], "error": []}
                for index in range(start, min(start + PAGE, batch.total)):
                    found = got.get(index)
                    if found is not None:
                        page["error" if found.failed else "output"].append(found.line)
                        batch.failed += found.failed
                        batch.completed += not found.failed
                        batch.input_tokens += found.input_tokens
                        batch.output_tokens += found.output_tokens
                    elif unrun and index < len(lines):
                        page["error"].append(_unrun(lines[index][1], unrun))
                        batch.failed += 1
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
            batch.status = status
            setattr(batch, f"{status}_at", int(time.time()))
            if cancelled:
                batch.cancelling_at = batch.cancelling_at or batch.cancelled_at
            await self.store.put_batch(batch)
            await self.store.drop_batch_results(batch.id)
            await self.store.release_batch(batch.id, self.finalizer)
        except Exception:  # its lease lapses and the next claim tries again
            log.exception("batch %s: finalizing failed", batch_id)


def _unrun(custom_id: str, code: str) -> bytes:
    message = {
        "batch_expired": "this request was not run before the batch's completion window ended",
        "batch_failed": "this request was not run: the batch failed",
    }.get(code, "this request was not run")
    line = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }
    return json.dumps(line).encode()


def _append(path: Path, kept: list[bytes]) -> None:
    with open(path, "ab") as out:
        out.writelines(line.rstrip(b"\n") + b"\n" for line in kept)


def _runner_only(context) -> None:
    if Tenant.of(context) != OPERATOR:
        raise errors.Forbidden("only a gateway's own calls run batches")
