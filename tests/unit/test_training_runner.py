"""A job's process: the progress protocol parsed, other output kept as log, exit status,
time limit, and cancel stopping the whole process group (real processes, no model)."""

from __future__ import annotations

import os
import sys
import textwrap
import time
from contextlib import aclosing
from pathlib import Path

import pytest

from cyllm.worker.training.jobs import to_proto
from cyllm.worker.training.runner import run_process


def _script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


async def _run(argv, tmp_path, limit=None):
    return [
        e
        async for e in run_process(
            argv, env=dict(os.environ), cwd=tmp_path, log_path=tmp_path / "job.log", time_limit_s=limit
        )
    ]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ends_soon(pid: int) -> bool:
    for _ in range(50):
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


async def test_protocol_lines_become_events_and_the_rest_is_log(tmp_path):
    events = await _run(
        _script(
            tmp_path,
            """
        import json, sys
        print("hello")
        print(json.dumps({"event": "progress", "step": 1, "total_steps": 2, "loss": 0.5}))
        print('{"event": "unknown"}')
        print("oops", file=sys.stderr)
        print(json.dumps({"event": "checkpoint", "step": 1, "path": "/x/checkpoint-1"}))
        print(json.dumps({"event": "result", "kind": "adapter", "path": "/x/adapter"}))
    """,
        ),
        tmp_path,
    )
    kinds = [(e["event"], e.get("message") or e.get("step") or e.get("code")) for e in events]
    assert ("log", "hello") in kinds and ("log", "oops") in kinds and ("log", '{"event": "unknown"}') in kinds
    assert [e["event"] for e in events if e["event"] != "log"] == ["progress", "checkpoint", "result", "exit"]
    assert events[-1] == {"event": "exit", "code": 0, "error": ""}
    assert "hello" in (tmp_path / "job.log").read_text()
    protos = [to_proto(e) for e in events]
    assert protos[-1].state == "succeeded"
    metrics = next(p for p in protos if p.type == "metrics")
    assert metrics.progress.step == 1 and metrics.progress.loss == 0.5 and "loss 0.5000" in metrics.message
    assert next(p for p in protos if p.type == "result").result_kind == "adapter"


async def test_failure_names_the_error_or_the_last_output(tmp_path):
    events = await _run(
        _script(
            tmp_path,
            """
        import json, sys
        print(json.dumps({"event": "error", "message": "dataset broken"}))
        sys.exit(2)
    """,
        ),
        tmp_path,
    )
    assert events[-1] == {"event": "exit", "code": 2, "error": "dataset broken"}
    events = await _run(
        _script(
            tmp_path,
            """
        raise SystemExit("bad things")
    """,
        ),
        tmp_path,
    )
    assert "exit status 1" in events[-1]["error"] and "bad things" in events[-1]["error"]
    assert to_proto(events[-1]).state == "failed"


async def test_children_holding_the_pipes_do_not_keep_a_finished_job_alive(tmp_path):
    started = time.monotonic()
    events = await _run(
        _script(
            tmp_path,
            """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open("child.pid", "w").write(str(child.pid))
        print("done")
    """,
        ),
        tmp_path,
    )
    assert events[-1]["code"] == 0 and time.monotonic() - started < 30
    assert _ends_soon(int((tmp_path / "child.pid").read_text()))


async def test_time_limit_stops_the_job(tmp_path):
    events = await _run(
        _script(
            tmp_path,
            """
        import time
        print("working", flush=True)
        time.sleep(600)
    """,
        ),
        tmp_path,
        limit=1.5,
    )
    assert "time limit of 1.5s" in events[-1]["error"]


async def test_closing_the_stream_kills_the_process_group(tmp_path):
    argv = _script(
        tmp_path,
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open("child.pid", "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(600)
    """,
    )
    async with aclosing(
        run_process(
            argv, env=dict(os.environ), cwd=tmp_path, log_path=tmp_path / "job.log", time_limit_s=None
        )
    ) as events:
        async for event in events:
            if event.get("message") == "ready":
                break
    assert _ends_soon(int((tmp_path / "child.pid").read_text()))


@pytest.mark.parametrize("line", ["not json", "{broken", '["event"]'])
async def test_lines_that_are_not_protocol_are_logs(line, tmp_path):
    events = await _run(_script(tmp_path, f"print({line!r})"), tmp_path)
    assert events[0] == {"event": "log", "message": line, "stream": "stdout"}


async def test_a_job_that_outgrows_its_memory_limit_is_stopped_and_says_so(tmp_path):
    """A job's memory is bounded (one asked for LoRA rank 4096 and took 4.1 GB): its
    processes together, child processes included, past the limit: stopped, with the
    reason."""
    argv = _script(
        tmp_path,
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
                                  "import time; held = bytearray(200 << 20); time.sleep(60)"])
        held = []
        for _ in range(40):  # 10 MiB a step, up to 400 MiB
            held.append(bytearray(10 << 20))
            time.sleep(0.05)
        time.sleep(60)
        """,
    )
    events = [
        e
        async for e in run_process(
            argv,
            env=dict(os.environ),
            cwd=tmp_path,
            log_path=tmp_path / "job.log",
            time_limit_s=120,
            memory_limit_bytes=300 << 20,
        )
    ]
    end = events[-1]
    assert end["event"] == "exit" and "over its limit of 0.3 GiB" in end["error"], end
