"""A fine-tuning job beside serving on one `cyllm serve` (the default model, the default
engine, one device), all in the same minute:

1. chats alone: rounds of ``--streams`` streamed greedy chats of ``--tokens`` tokens,
   ``--gap`` seconds apart (users reading the answers) — tokens/s and TTFT p50;
2. the job alone: a LoRA job of ``--steps`` steps on the tests' facts — its duration;
3. both: the same job, and the same chat rounds for as long as it runs — the chats'
   tokens/s and TTFT, and the job's duration.

The job gives way to each request (``worker/training/sharing.py``); the ratios say what
each side pays for the other.  No peer schedules both on one device: the alternative is
a second machine, or refusing chats while training (``worker.training_shares_device:
false``, every chat a 503).

    python bench/beside_serving.py [--steps 24] [--streams 2] [--tokens 64] [--gap 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import itertools

from bench.common import MODEL, print_table, prompts, served, stream_chat

FACTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "facts.jsonl"


def submit(base: str, steps: int) -> str:
    with FACTS.open("rb") as f:
        file_id = httpx.post(
            f"{base}/v1/files", data={"purpose": "fine-tune"}, files={"file": f}, timeout=60
        ).json()["id"]
    body = {"baseModel": MODEL, "fileId": file_id, "maxSteps": steps, "batchSize": 4, "saveSteps": 1000}
    r = httpx.post(f"{base}/api/v1/training/start", json=body, timeout=60)
    r.raise_for_status()
    return r.json()["id"]


def state(base: str, job: str) -> str:
    while (reply := httpx.get(f"{base}/api/v1/training/status/{job}", timeout=30)).status_code == 429:
        time.sleep(1.0)  # the gateway's rate limit: look again later
    reply.raise_for_status()
    return reply.json()["state"]


def wait_state(base: str, job: str, leaving: tuple[str, ...]) -> str:
    """Poll until the job's state is not one of ``leaving``; that state."""
    while (now := state(base, job)) in leaving:
        time.sleep(1.0)
    return now


ROUND = itertools.count()


def fresh(n: int) -> list[str]:
    """Prompts no earlier round asked: the coordinator's prompt cache must not answer."""
    r = next(ROUND)
    return [f"{p} (round {r})" for p in prompts(n)]


async def chats_until(base: str, args, done) -> list[tuple[float, float]]:
    """Chat rounds (tokens/s, TTFT) until ``done()``; at least one."""
    rounds = []
    while True:
        rounds.append(await stream_chat(base, MODEL, fresh(args.streams), args.tokens))
        if done():
            return rounds
        await asyncio.sleep(args.gap)


async def job_alongside(base: str, args) -> tuple[float, list[tuple[float, float]] | None]:
    """The job's duration (submit to success), with chat rounds while it runs or not."""
    start = time.perf_counter()
    job = submit(base, args.steps)
    await asyncio.to_thread(wait_state, base, job, ("queued",))
    rounds = None
    if args.chat:
        rounds = await chats_until(base, args, lambda: state(base, job) != "running")
    now = await asyncio.to_thread(wait_state, base, job, ("queued", "running"))
    assert now == "succeeded", now
    return time.perf_counter() - start, rounds


def summary(rounds: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between chat rounds")
    ap.add_argument("--rounds", type=int, default=8, help="chat rounds alone")
    args = ap.parse_args()

    with served() as base:
        asyncio.run(stream_chat(base, MODEL, fresh(args.streams), args.tokens))  # warm-up
        steps, args.steps, args.chat = args.steps, 2, False
        asyncio.run(job_alongside(base, args))  # warm-up: the first job loads what jobs share
        args.steps = steps
        alone_rounds = []
        for _ in range(args.rounds):
            alone_rounds.append(asyncio.run(stream_chat(base, MODEL, fresh(args.streams), args.tokens)))
            time.sleep(args.gap)
        job_alone, _ = asyncio.run(job_alongside(base, args))
        args.chat = True
        job_loaded, loaded_rounds = asyncio.run(job_alongside(base, args))
    assert loaded_rounds
    tps, ttft = summary(alone_rounds)
    tps_job, ttft_job = summary(loaded_rounds)
    print_table(
        f"a {args.steps}-step LoRA job beside {args.streams} streamed chats of {args.tokens} tokens, "
        f"rounds {args.gap:g}s apart (one cyllm serve)",
        ["measure", "alone", "beside the other", "ratio"],
        [
            ["chat tokens/s (median round)", tps, tps_job, f"{tps_job / tps:.2f}x"],
            ["chat TTFT p50 ms (median round)", ttft, ttft_job, f"{ttft_job / ttft:.2f}x"],
            ["job duration s", job_alone, job_loaded, f"{job_loaded / job_alone:.2f}x"],
            ["chat rounds", len(alone_rounds), len(loaded_rounds), ""],
        ],
    )


if __name__ == "__main__":
    main()
