"""A training job beside serving: its process group is stopped while the worker answers
inference and continued when it is idle; under unbroken load it still runs its share;
paused time is not counted against its time limit; a cancel reaches a paused job (real
processes, no model)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from contextlib import aclosing

import pytest

from cyllm.worker.training.runner import run_process
from cyllm.worker.training.sharing import Demand, Yielding
from tests.polling import returns, until


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


async def becomes(pid: int, state: str, what: str) -> None:
    await until(lambda: returns(_state(pid)), lambda s: s == state, timeout=2, every=0.01, what=what)


@pytest.fixture
def busy_child():
    """A process group of its own, computing."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


async def test_the_job_stops_while_inference_runs_and_continues_after(busy_child):
    demand = Demand()
    yielding = Yielding(demand, share=0.1, linger=0.1)
    task = asyncio.create_task(yielding.run(busy_child.pid))
    await asyncio.sleep(0.1)
    assert _state(busy_child.pid) == "R"
    with demand.serving():
        await becomes(busy_child.pid, "T", "stopped for a request")
        with demand.serving():  # a second call meanwhile: still one pause
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.2)
        assert _state(busy_child.pid) == "T"
    await becomes(busy_child.pid, "R", "continued when idle")
    assert yielding.pauses == 1 and 0.3 < yielding.paused_s() < 2
    # a new call after the linger: a new pause
    with demand.serving():
        await becomes(busy_child.pid, "T", "stopped again")
        task.cancel()  # the job ends its giving way: left running
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _state(busy_child.pid) == "R"


@pytest.mark.parametrize("share", [0.0, 0.4])
async def test_under_unbroken_load_the_job_runs_its_share(share, busy_child):
    demand = Demand()
    yielding = Yielding(demand, share=share, period=0.5, linger=0.05)
    task = asyncio.create_task(yielding.run(busy_child.pid))
    states = []
    with demand.serving():
        start = time.monotonic()
        while time.monotonic() - start < 2.5:
            states.append(_state(busy_child.pid))
            await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    ran = sum(s == "R" for s in states[5:]) / len(states[5:])
    if share == 0:
        assert ran == 0, states
    else:
        assert 0.2 < ran < 0.6, (ran, states)  # about 0.4 of the time


def _script(tmp_path, body: str) -> list[str]:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


async def test_paused_time_is_not_counted_against_the_time_limit(tmp_path):
    argv = _script(
        tmp_path,
        """
        import json, time
        while time.process_time() < 0.5:  # half a second of its own compute
            pass
        print(json.dumps({"event": "log", "message": "done"}), flush=True)
        """,
    )
    demand = Demand()

    async def load() -> None:  # inference for the job's first 2 s
        with demand.serving():
            await asyncio.sleep(2.0)

    held = asyncio.create_task(load())
    await asyncio.sleep(0)
    run = run_process(
        argv,
        env=dict(os.environ),
        cwd=tmp_path,
        log_path=tmp_path / "job.log",
        time_limit_s=2.0,  # passed by the clock (2.5 s), not by the job's own running time
        yielding=Yielding(demand, share=0.0, linger=0.05),
    )
    events = [e async for e in run]
    await held
    assert events[-1] == {"event": "exit", "code": 0, "error": ""}, events
    messages = [e.get("message", "") for e in events]
    assert "done" in messages
    assert any(m.startswith("gave way to inference 1 times, 2s in all") for m in messages), messages


async def test_a_cancel_reaches_a_paused_job(tmp_path):
    argv = _script(
        tmp_path,
        """
        import json, os, time
        print(json.dumps({"event": "log", "message": str(os.getpid())}), flush=True)
        time.sleep(600)
        """,
    )
    demand = Demand()
    run = run_process(
        argv,
        env=dict(os.environ),
        cwd=tmp_path,
        log_path=tmp_path / "job.log",
        time_limit_s=None,
        yielding=Yielding(demand, share=0.0),
    )
    async with aclosing(run) as stream:
        pid = int((await anext(stream))["message"])
        with demand.serving():
            await becomes(pid, "T", "paused")
            await stream.aclose()  # cancelled while paused
    # the job is gone, though it was paused
    await until(lambda: returns(os.path.exists(f"/proc/{pid}")), lambda alive: not alive, what="the job gone")
