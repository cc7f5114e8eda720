"""Interactive chats beside a running batch (``/v1/batches``) on one `cyllm serve` (the
default model and engine), in the same minute:

1. chats alone: rounds of ``--streams`` streamed greedy chats of ``--tokens`` tokens,
   ``--gap`` seconds apart — tokens/s and TTFT p50;
2. the same rounds while a batch of ``--requests`` chat requests of ``--batch-tokens``
   tokens runs (``gateway.batch_concurrency`` of them at once, queued below every
   interactive request) — the chats' tokens/s and TTFT, and the batch's own requests/s.

The ratio is what a batch costs the interactive callers.  The peer is OpenAI's Batch
API, whose promise is only "within 24 hours"; `vllm serve` has no batch endpoint (its
``run-batch`` is an offline command that owns the GPU, with no interactive traffic).

    python bench/batch_priority.py [--streams 2] [--tokens 64] [--rounds 8] [--requests 48]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MODEL, print_table, prompts, served, stream_chat

ROUND = itertools.count()


def fresh(n: int) -> list[str]:
    """Prompts no earlier round asked: the coordinator's prompt cache must not answer."""
    r = next(ROUND)
    return [f"{p} (round {r})" for p in prompts(n)]


def submit(base: str, n: int, tokens: int) -> str:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"{p} (batch line {i})"}],
                "max_tokens": tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i, p in enumerate(prompts(n))
    ]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    f = httpx.post(
        f"{base}/v1/files", data={"purpose": "batch"}, files={"file": ("b.jsonl", data)}, timeout=60
    )
    f.raise_for_status()
    r = httpx.post(
        f"{base}/v1/batches",
        json={"input_file_id": f.json()["id"], "endpoint": "/v1/chat/completions"},
        timeout=60,
    )
    r.raise_for_status()
    return r.json()["id"]


def batch(base: str, batch_id: str) -> dict:
    return httpx.get(f"{base}/v1/batches/{batch_id}", timeout=30).json()


async def rounds(base: str, args) -> list[tuple[float, float]]:
    out = []
    for _ in range(args.rounds):
        out.append(await stream_chat(base, MODEL, fresh(args.streams), args.tokens))
        await asyncio.sleep(args.gap)
    return out


def summary(found: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in found), statistics.median(r[1] for r in found) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between chat rounds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48, help="requests in the batch")
    ap.add_argument("--batch-tokens", type=int, default=128)
    args = ap.parse_args()

    with served() as base:
        asyncio.run(stream_chat(base, MODEL, fresh(args.streams), args.tokens))  # warm-up
        alone = asyncio.run(rounds(base, args))
        batch_id = submit(base, args.requests, args.batch_tokens)
        while batch(base, batch_id)["request_counts"]["completed"] < 1:
            time.sleep(0.5)  # running, its first results in
        start, before = time.perf_counter(), batch(base, batch_id)["request_counts"]["completed"]
        beside = asyncio.run(rounds(base, args))
        state = batch(base, batch_id)
        ran = (state["request_counts"]["completed"] - before) / (time.perf_counter() - start)
        assert state["status"] == "in_progress", "the batch ended before the rounds: raise --requests"
        httpx.post(f"{base}/v1/batches/{batch_id}/cancel", timeout=30)
    tps, ttft = summary(alone)
    tps_b, ttft_b = summary(beside)
    print_table(
        f"{args.streams} streamed chats of {args.tokens} tokens, rounds {args.gap:g}s apart, alone and "
        f"beside a batch of {args.batch_tokens}-token chat requests (one cyllm serve)",
        ["measure", "alone", "beside a batch", "ratio"],
        [
            ["chat tokens/s (median round)", tps, tps_b, f"{tps_b / tps:.2f}x"],
            ["chat TTFT p50 ms (median round)", ttft, ttft_b, f"{ttft_b / ttft:.2f}x"],
            ["batch requests/s meanwhile", "", f"{ran:.2f}", ""],
        ],
    )


if __name__ == "__main__":
    main()
