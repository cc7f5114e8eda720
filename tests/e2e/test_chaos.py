"""Machines dying under load, with real processes on a real Redis (``bench/chaos.py``'s
stack): the short chaos run of the benchmark, and the default model's greedy answers
through a worker and a coordinator SIGKILLed mid-generation, equal to undisturbed ones."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from bench import chaos
from bench.common import MODEL


def test_a_short_chaos_run_loses_and_corrupts_nothing(tmp_path):
    calm, storm, kills = chaos.run(
        "fake", duration=12, concurrency=16, max_tokens=24, kill_every=2.5, seed=1, tmp=tmp_path
    )
    assert kills >= 3
    assert (calm.failed, calm.corrupted) == (0, 0), calm.errors
    assert storm.served > 50
    assert (storm.failed, storm.corrupted) == (0, 0), storm.errors


@pytest.fixture
def model_stack(tmp_path):
    stack, base = chaos.build(tmp_path, "transformers", progress_timeout_s=30.0, workers=2)
    try:
        chaos.start_all(stack, base)
        yield stack, base
    finally:
        stack.stop()


def test_the_default_models_answers_survive_a_worker_and_a_coordinator_killed(model_stack):
    stack, base = model_stack
    reference = asyncio.run(chaos.references(base, MODEL, 48))
    assert all(len(t.split()) > 20 for t in reference.values()), reference  # long answers

    async def batch(victim: str) -> list[chaos.Result]:
        async with httpx.AsyncClient(timeout=300) as http:
            asks = [
                asyncio.create_task(chaos.ask(http, base, MODEL, p, 48, stream=i % 2 == 0))
                for i, p in enumerate(chaos.PROMPTS)
            ]
            await asyncio.sleep(1.0)  # every answer under way
            assert not any(a.done() for a in asks), "answers finished before the kill"
            stack.kill(victim)
            return list(await asyncio.gather(*asks))

    for victim in ("w1", "c1"):
        results = asyncio.run(batch(victim))
        bad = [(r.prompt, r.error or r.text) for r in results if not r.ok or r.text != reference[r.prompt]]
        assert not bad, (victim, bad)
        stack.start(victim)
    logs = {n: (stack.tmp / f"{n}.log").read_text() for n in ("c1", "c2", "gateway")}
    # each kill was survived by continuing the running answers elsewhere, said where it happened
    assert re.search(r"worker w1 failed \(.*\); continuing on the next", logs["c1"] + logs["c2"])
    assert re.search(r"coordinator \S+ failed \(.*\); continuing on the next", logs["gateway"])
