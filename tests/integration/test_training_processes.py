"""A job of two processes (torchrun, gloo, on the CPU) as the worker launches it: the same
losses and weights as one process with the same global batch; both ranks give way to
inference; one rank killed fails the job with every rank gone and a reason; the job
resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from cyllm.training.spec import TrainingSpec
from cyllm.worker.settings import WorkerSettings
from cyllm.worker.training.jobs import WorkerTraining
from cyllm.worker.training.runner import run_process
from cyllm.worker.training.sharing import Demand, Yielding
from tests.polling import returns, until

DATA = Path(__file__).parents[1] / "data" / "facts.jsonl"


def _spec(**kw) -> dict:
    return {
        "base_model": "smollm2-135m-instruct",
        "dataset": str(DATA),
        "max_length": 128,
        "packing": False,  # eight examples: a batch each process can split
        "precision": "float32",
        "learning_rate": 1e-3,
        "options": {"lora_dropout": 0.0},  # no randomness that differs by process
        **kw,
    }


async def _run(
    out: Path, default_model_dir, spec: dict, resume_from: str = "", on_event=None, yielding=None
) -> list[dict]:
    """The job as the worker runs it: its command (torchrun for several processes) under
    the runner."""
    parsed = TrainingSpec.parse(spec)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240  (a test's folder)
    job = {
        "spec": parsed.model_dump(mode="json"),
        "output_dir": str(out),
        "device": "cpu",
        "resume_from": resume_from,
        "threads": 2,
        "base_model_path": str(default_model_dir),
    }
    (out / "job.json").write_text(json.dumps(job))
    argv = WorkerTraining(WorkerSettings(), dict, "cpu", lambda: None)._command(parsed, out)
    events = []
    async for event in run_process(
        argv, env=dict(os.environ), cwd=out, log_path=out / "job.log", time_limit_s=600, yielding=yielding
    ):
        events.append(event)
        if on_event is not None:
            await on_event(event)
    return events


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


async def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, default_model_dir):
    one = await _run(tmp_path / "one", default_model_dir, _spec(batch_size=8, max_steps=3))
    two = await _run(tmp_path / "two", default_model_dir, _spec(batch_size=4, max_steps=3, processes=2))
    assert one[-1]["code"] == 0 and two[-1]["code"] == 0, (
        one[-1],
        two[-1],
        (tmp_path / "two/job.log").read_text(),
    )
    assert any(e.get("message") == "2 processes, gloo, ddp" for e in two)
    losses = {
        n: [e["loss"] for e in ev if e["event"] == "progress"] for n, ev in (("one", one), ("two", two))
    }
    assert len(losses["two"]) == 3, two  # one report a step: the first process's
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-3), losses
    tokens = {
        n: [e["tokens"] for e in ev if e["event"] == "progress"][-1] for n, ev in (("one", one), ("two", two))
    }
    assert tokens["one"] == tokens["two"] > 0  # both processes' tokens counted
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4, rtol=1e-3), name
    assert [e for e in two if e["event"] == "result"]  # reported once


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _ranks(job: Path) -> list[int]:
    """The job's training processes: torchrun's children, which name its job file."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if str(job).encode() not in f.read():
                    continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if b"LOCAL_RANK=" in f.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_a_killed_rank_fails_the_job_with_every_rank_gone_and_it_resumes(tmp_path, default_model_dir):
    out = tmp_path / "job"
    killed: list[int] = []
    demand = Demand()

    async def kill_a_rank(event: dict) -> None:
        if event["event"] == "checkpoint" and not killed:
            ranks = _ranks(out / "job.json")
            assert len(ranks) == 2, ranks
            with demand.serving():  # inference on the worker: both ranks give way
                await until(
                    lambda: returns([_state(p) for p in ranks]),
                    lambda s: s == ["T", "T"],
                    what="ranks stopped",
                )
            await until(
                lambda: returns([_state(p) for p in ranks]), lambda s: "T" not in s, what="ranks going on"
            )
            killed.extend(ranks)
            os.kill(max(ranks), signal.SIGKILL)  # one rank dies

    events = await _run(
        out,
        default_model_dir,
        _spec(batch_size=4, max_steps=200, save_steps=2, processes=2),
        on_event=kill_a_rank,
        yielding=Yielding(demand, share=0.0, linger=0.05, processes=2),
    )
    assert killed
    end = events[-1]
    assert end["event"] == "exit" and end["code"] != 0 and end["error"], end
    await until(
        lambda: returns([p for p in killed if os.path.exists(f"/proc/{p}")]),
        lambda alive: not alive,
        what="every rank gone",
    )
    checkpoints = [e["path"] for e in events if e["event"] == "checkpoint"]
    assert checkpoints
    again = await _run(
        out,
        default_model_dir,
        _spec(batch_size=4, max_steps=int(checkpoints[-1].rsplit("-", 1)[1]) + 1, save_steps=2, processes=2),
        resume_from=checkpoints[-1],
    )
    assert again[-1]["code"] == 0, again[-3:]
    assert any("resumed from step" in e.get("message", "") for e in again)
