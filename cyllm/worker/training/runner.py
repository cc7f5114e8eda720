"""A training job's process: started, read, limited in time, stopped.

Both the built-in trainer and a user's ``custom`` script run as a child process in a
session of their own (so cancel stops the whole process group, grandchildren included)
that dies with the worker (``launch.py``).  The child reports on stdout, one JSON object
per line — the **progress protocol** custom scripts speak too::

    {"event": "progress", "step": 10, "total_steps": 100, "epoch": 0.5, "loss": 1.23,
     "learning_rate": 0.0002, "tokens_per_second": 950.0, "eta_s": 42.0, "tokens": 12000}
    {"event": "eval", "step": 10, "eval_loss": 1.31}   (the loss on the validation data)
    {"event": "evaluation", "of": "base" | "incumbent" | "result", "scores": {"eval_loss": 1.2}}
    {"event": "checkpoint", "step": 10, "path": "/abs/path/checkpoint-10"}
    {"event": "result", "kind": "adapter" | "peft" | "model", "path": "/abs/path"}
    {"event": "log", "message": "anything worth showing"}
    {"event": "error", "message": "why it failed"}

Any other line on stdout or stderr becomes a log event; the whole output is also kept in
``<output dir>/job.log``.  Fields other than ``event`` are optional.  ``result`` names
what to serve: a PEFT LoRA folder (``adapter``, served beside its base), another PEFT
adapter (``peft``, served as a model of its own) or a full model folder (``model``).
``evaluation`` scores a whole model on the validation data (the built-in trainer's: the
base before training, the result after, and for a promotion the alias's target).  Exit status 0 is
success; anything else is failure (with the last ``error`` message, or the last lines of
output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from cyllm import cores
from cyllm.worker.training.processes import group_memory, signal_job
from cyllm.worker.training.sharing import Yielding

_LINE_LIMIT = 1 << 20
_KILL_GRACE_S = 5.0
_DRAIN_S = 2.0
_POLL_S = 0.5


async def run_process(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    time_limit_s: float | None,
    memory_limit_bytes: int | None = None,
    yielding: Yielding | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Events of the child's run, ending with ``{"event": "exit", "code", "error"}``.

    ``yielding``: the job gives way to inference on its device (``sharing.py``); the time
    it spends stopped does not count against ``time_limit_s`` (up to ``time_limit_s``
    more).

    ``memory_limit_bytes``: the resident memory the job's whole process group may use;
    past it the job is stopped and says so (a limit on the group's address space would
    refuse what CUDA merely reserves; a group's resident memory is what the machine
    gives).  Closing the iterator early (a cancelled job) stops the process group."""
    cwd.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240  (one folder, once per job)
    with cores.whole_machine():  # not the serving threads' cores (cyllm.cores)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cyllm.worker.training.launch",
            *argv,
            cwd=str(cwd),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=_LINE_LIMIT,
        )
    assert proc.stdout is not None and proc.stderr is not None  # both piped
    lines: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()
    readers = [
        asyncio.create_task(_pump(name, stream, lines))
        for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    giving_way = asyncio.create_task(yielding.run(proc.pid)) if yielding is not None else None
    started = time.monotonic()

    def deadline() -> float | None:
        """Paused time is not the job's: it is added to its limit, up to the limit itself
        (a job under unbroken load still ends within twice its limit)."""
        if not time_limit_s:
            return None
        return (
            started + time_limit_s + min(yielding.paused_s() if yielding is not None else 0.0, time_limit_s)
        )

    drain_until: float | None = None  # set when the process exits: read what is left, briefly
    tail: deque[str] = deque(maxlen=20)
    last_error = ""
    open_streams, timed_out = 2, False
    over: int | None = None  # the group's memory, when it went past its limit
    next_look = time.monotonic()
    try:
        with log_path.open("a", encoding="utf-8") as log:
            while open_streams:
                if memory_limit_bytes is not None and time.monotonic() >= next_look:
                    next_look = time.monotonic() + _POLL_S
                    used = await asyncio.to_thread(group_memory, proc.pid)
                    if used > memory_limit_bytes:
                        over = used
                        break
                # The exit is polled: asyncio's wait() also waits for the pipes, which
                # children the job left behind may hold open for ever.
                if proc.returncode is not None and drain_until is None:
                    drain_until = time.monotonic() + _DRAIN_S  # read what is left, briefly
                ends = [t for t in (deadline(), drain_until) if t is not None]
                now = time.monotonic()
                if ends and now >= min(ends):
                    timed_out = drain_until is None
                    break
                try:
                    name, raw = await asyncio.wait_for(
                        lines.get(), min(_POLL_S, min(ends) - now) if ends else _POLL_S
                    )
                except TimeoutError:
                    continue
                if raw is None:
                    open_streams -= 1
                    continue
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                log.write(text + "\n")
                log.flush()
                event = _parse(text) if name == "stdout" else None
                if event is None:
                    if text.strip():
                        tail.append(text)
                        yield {"event": "log", "message": text[:2000], "stream": name}
                    continue
                if event["event"] == "error":
                    last_error = str(event.get("message", ""))
                yield event
        await _stop_giving_way(giving_way)
        if yielding is not None and yielding.pauses:
            yield {
                "event": "log",
                "message": f"gave way to inference {yielding.pauses} times, "
                f"{yielding.paused_s():.0f}s in all (worker.training_shares_device)",
            }
        if timed_out or over is not None:
            await _stop(proc)
            why = (
                f"the job ran past its time limit of {time_limit_s:g}s and was stopped"
                if over is None
                else f"the job used {_gib(over)} of memory, over its limit of "
                f"{_gib(memory_limit_bytes or 0)} (worker.training_memory_gib), and was stopped"
            )
            yield {"event": "exit", "code": proc.returncode, "error": why}
            return
        # Pipes closed: wait() returns with the process; exited with pipes held: known.
        code = proc.returncode if proc.returncode is not None else await proc.wait()
        await asyncio.to_thread(signal_job, proc.pid, signal.SIGKILL)  # a finished job leaves nothing running
        error = "" if code == 0 else (last_error or _describe_exit(code, tail))
        yield {"event": "exit", "code": code, "error": error}
    finally:
        await _stop_giving_way(giving_way)
        if proc.returncode is None:
            await _stop(proc)
        for task in readers:
            task.cancel()


async def _stop_giving_way(task: asyncio.Task[None] | None) -> None:
    """The job's group left running (a stopped group would not see a SIGTERM)."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _pump(
    name: str, stream: asyncio.StreamReader, out: asyncio.Queue[tuple[str, bytes | None]]
) -> None:
    try:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: keep its start
                line = (await stream.read(_LINE_LIMIT))[:2000] + b"...\n"
            if not line:
                break
            await out.put((name, line))
    finally:
        await out.put((name, None))


def _parse(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or event.get("event") not in (
        "progress",
        "eval",
        "evaluation",
        "checkpoint",
        "result",
        "log",
        "error",
    ):
        return None
    return event


def _describe_exit(code: int, tail: deque[str]) -> str:
    how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    last = " | ".join(list(tail)[-5:])
    return f"the training process ended with {how}" + (f"; last output: {last}" if last else "")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM to the job's process group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, _KILL_GRACE_S), (signal.SIGKILL, 10.0)):
        # every process of the job (torchrun's ranks are outside its group); a stopped
        # process acts on SIGTERM once continued
        await asyncio.to_thread(signal_job, proc.pid, sig)
        await asyncio.to_thread(signal_job, proc.pid, signal.SIGCONT)
        try:
            async with asyncio.timeout(wait):
                while proc.returncode is None:  # noqa: ASYNC110  (wait() also waits for the pipes)
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(signal_job, proc.pid, signal.SIGKILL)  # stragglers
            return
        except TimeoutError:
            continue


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"
