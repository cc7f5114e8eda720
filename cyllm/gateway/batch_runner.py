"""Running batches (``/v1/batches``) in a gateway, at the lowest priority.

Every gateway with ``batch_concurrency`` above 0 asks the coordinator for a batch to
run (``ClaimBatch``, under a lease) every ``batch_poll_s``, and sends its requests
through its own routes, in this process, as the batch's creator: the same checks,
limits and answers as the creator's own requests (``AuthMiddleware`` takes the creator
from the ASGI scope, where only this module puts it; an API key revoked since is a
401 on each line).

The rule by which a batch yields to interactive traffic:

- a gateway runs at most ``batch_concurrency`` of a batch's requests at once, so a
  batch holds at most that many of a worker's slots per gateway;
- each is queued at priority ``BATCH_PRIORITY``, below the lowest an interactive
  caller may ask (-100): whenever a slot frees, a waiting interactive request takes it
  before any batch request;
- the requests count against their owner's limits like any other (tokens and
  requests per minute, generations at once); over a limit (429), or with the queue
  full or no worker (503), a request waits and is sent again until the batch stops —
  a batch is throttled by its owner's budget and by outages, never failed by them;
- a runner works on a batch for ``SLICE_S`` at most, then gives it back and takes the
  one run least recently: batches (and so tenants) take turns.

Results go to the coordinator every ``REPORT_EVERY_S`` (which renews the lease); a
gateway that stops gives its batch back (a killed one lets the lease run out), and the
next runner resumes it from the lines that have no result yet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import httpx
from starlette.types import ASGIApp, Receive, Scope, Send

from cyllm import errors
from cyllm.gateway.auth import Identity
from cyllm.gateway.client import CoordinatorClient
from cyllm.gateway.context import BATCH_CALLER
from cyllm.protocol import pb

log = logging.getLogger(__name__)

LEASE_S = 60.0
SLICE_S = 60.0
REPORT_EVERY_S = 2.0
MAX_REPORT_BYTES = 2 << 20  # results per report, well under gRPC's 4 MiB message
MAX_RESULT_BYTES = 3 << 20  # one output line; a larger answer is a failed line
BIG_JSON = 64 << 10  # JSON parsed or written on a thread beyond this


class BatchRunner:
    def __init__(
        self, app: ASGIApp, client: CoordinatorClient, concurrency: int, poll_s: float, admin_scope: str
    ) -> None:
        self.app, self.client = app, client
        self.concurrency, self.poll_s, self.admin_scope = concurrency, poll_s, admin_scope
        self.runner = f"gateway-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._forever(), name="cyllm-batches")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _forever(self) -> None:
        while True:
            try:
                claimed = await self.client.batch(
                    "ClaimBatch", pb.ClaimBatchRequest(runner=self.runner, lease_s=LEASE_S)
                )
            except errors.CyllmError as exc:
                log.warning("batches: cannot ask for one to run: %s", exc)
                claimed = pb.ClaimedBatch()
            if not claimed.batch.id:
                await asyncio.sleep(self.poll_s)
                continue
            try:
                await _Run(self, claimed).run()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in one batch must not end the runner
                log.exception("batches: running %s failed; its lease will lapse", claimed.batch.id)
                await asyncio.sleep(self.poll_s)


class _Run:
    """One claimed batch, run until its lines are done, its turn is over or it is stopped."""

    def __init__(self, runner: BatchRunner, claimed: pb.ClaimedBatch) -> None:
        self.runner = runner
        self.batch = claimed.batch
        self.done = set(claimed.done)
        caller = json.loads(self.batch.caller_json or "{}")
        models = caller.get("models")
        self.identity = Identity(
            self.batch.owner,
            str(caller.get("kind", "anonymous")),
            frozenset(caller.get("scopes") or ()),
            frozenset(models) if models is not None else None,
            runner.admin_scope,
        )
        self.pending: list[pb.BatchResult] = []
        self.pending_bytes = 0
        self.stopped = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._reported = time.monotonic()  # the lease's last renewal

    async def _as_owner(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[BATCH_CALLER] = self.identity
        await self.runner.app(scope, receive, send)

    async def run(self) -> None:
        transport = httpx.ASGITransport(app=self._as_owner)
        http = httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None)
        reporter = asyncio.create_task(self._report_forever())
        slots = asyncio.Semaphore(self.runner.concurrency)
        tasks = self.tasks
        failure, finished, turn_over = "", False, False
        until = time.monotonic() + SLICE_S
        try:
            async with aclosing(self._lines()) as lines:
                async for index, raw in lines:
                    if index in self.done:
                        continue
                    await slots.acquire()
                    if self.stopped.is_set():
                        break
                    if time.monotonic() > until:  # its turn is over: the running lines finish
                        slots.release()
                        turn_over = True
                        break
                    task = asyncio.create_task(self._one(http, index, raw))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(lambda _: slots.release())
            if tasks:  # the last lines run (a stop cancels them)
                await asyncio.wait(list(tasks))
            finished = not self.stopped.is_set() and not turn_over
        except errors.NotFound:
            failure = "the batch's input file was deleted while it ran"
        finally:
            reporter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, reporter, return_exceptions=True)
            await http.aclose()
            # Said even when this gateway is stopping: the next runner starts at once.
            await asyncio.shield(self._flush(finished=finished, failure=failure, release=not finished))

    async def _lines(self) -> AsyncGenerator[tuple[int, bytes], None]:
        """Its requests, numbered as ``coordinator/batch_input`` numbers them."""
        index, buffer = 0, b""
        reader = self.runner.client.acting_for(self.identity.tenant).read_file(self.batch.input_file_id)
        async for chunk in reader:
            buffer += chunk.data
            *whole, buffer = buffer.split(b"\n")
            for raw in whole:
                if raw.strip():
                    yield index, raw
                    index += 1
            if self.stopped.is_set():
                return
        if buffer.strip():
            yield index, buffer

    async def _one(self, http: httpx.AsyncClient, index: int, raw: bytes) -> None:
        request = await _json(json.loads, raw, len(raw))
        try:
            status, body, request_id = await self._send(http, request)
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the line fails, never the batch
            log.exception("batches: line %d of %s", index, self.batch.id)
            status, request_id = 500, ""
            body = {
                "error": {
                    "message": f"the request could not be run: {type(exc).__name__}",
                    "type": "server_error",
                }
            }
        line: dict[str, Any] = {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": request["custom_id"],
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
        data = (
            await _json(json.dumps, line, len(raw) + BIG_JSON * (request["url"] == "/v1/embeddings"))
        ).encode()
        if len(data) > MAX_RESULT_BYTES:
            status = 413
            line["response"] = None
            line["error"] = {
                "code": "response_too_large",
                "message": f"the answer is over the {MAX_RESULT_BYTES} bytes a batch output line may hold",
            }
            data = json.dumps(line).encode()
        usage = body.get("usage") if isinstance(body, dict) else None
        counts = {k: v for k, v in usage.items() if isinstance(v, int)} if isinstance(usage, dict) else {}
        self.pending.append(
            pb.BatchResult(
                index=index,
                failed=status >= 400,
                line=data,
                input_tokens=counts.get("prompt_tokens", 0),
                output_tokens=counts.get("completion_tokens", 0),
            )
        )
        self.pending_bytes += len(data)
        if self.pending_bytes > MAX_REPORT_BYTES:
            await self._flush()

    async def _send(self, http: httpx.AsyncClient, request: dict[str, Any]) -> tuple[int, Any, str]:
        """Its answer; over a limit or with no capacity it waits and sends it again."""
        waits = 0
        while True:
            reply = await http.post(request["url"], json=request["body"])
            if reply.status_code not in (429, 503):
                try:
                    body = await _json(httpx.Response.json, reply, len(reply.content))
                except ValueError:
                    body = {"error": {"message": reply.text[:500], "type": "server_error"}}
                return reply.status_code, body, reply.headers.get("x-request-id", "")
            try:
                wait = max(float(reply.headers.get("retry-after", "1")), 0.5)
            except ValueError:
                wait = 1.0
            # 429: the owner's limits say when; 503 (no worker, queue full): backing off
            if reply.status_code == 503:
                wait *= 2 ** min(waits, 5)
            waits += 1
            try:
                await asyncio.wait_for(self.stopped.wait(), min(wait, 30.0))
                raise asyncio.CancelledError  # stopped while waiting: not a result
            except TimeoutError:
                pass

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            await self._flush()

    async def _flush(self, finished: bool = False, failure: str = "", release: bool = False) -> None:
        """Send what has run, in reports of at most ``MAX_REPORT_BYTES`` (each renews the
        lease); a reply may stop the batch.  Reports failing for most of a lease mean
        another runner may take it over: this one stops."""
        async with self._lock:
            while True:
                results: list[pb.BatchResult] = []
                size = 0
                while self.pending and (not results or size + len(self.pending[0].line) <= MAX_REPORT_BYTES):
                    size += len(self.pending[0].line)
                    results.append(self.pending.pop(0))
                self.pending_bytes -= size
                last = not self.pending
                report = pb.BatchReport(
                    id=self.batch.id,
                    runner=self.runner.runner,
                    lease_s=LEASE_S,
                    results=results,
                    finished=finished and last,
                    release=release and last,
                    failure=failure if last else "",
                )
                try:
                    reply = await self.runner.client.batch("ReportBatch", report)
                except errors.CyllmError as exc:
                    log.warning("batches: cannot report on %s: %s", self.batch.id, exc)
                    self.pending[:0] = results  # sent again with the next report
                    self.pending_bytes += size
                    if time.monotonic() - self._reported > LEASE_S * 0.8:
                        self._stop()
                    return
                self._reported = time.monotonic()
                if reply.stop:
                    self._stop()
                    return
                if last:
                    return

    def _stop(self) -> None:
        """Cancelled, expired, or no longer ours: its running lines end now."""
        self.stopped.set()
        for task in self.tasks:
            task.cancel()


async def _json(work: Any, value: Any, size: int) -> Any:
    """``work(value)``, JSON in or out, on a thread when it is large: never a long
    stretch of the event loop."""
    return await asyncio.to_thread(work, value) if size > BIG_JSON else work(value)
