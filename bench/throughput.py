"""Served tokens/s on the default model at 1, 8 and 32 concurrent streams.

Three ways, measured in the same run: plain padded ``model.generate`` (the baseline),
the transformers engine called in-process, and the full stack (``cyllm serve`` on the
transformers engine:
gateway -> coordinator -> worker, streaming chat over HTTP).  Greedy decoding of
story prompts, ``--max-tokens`` new tokens each; tokens/s counts generated tokens
(stopping at EOS), time to first token (TTFT) is the median over streams.

    python bench/throughput.py [--streams 1 8 32] [--max-tokens 128] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import MODEL, print_table, served, stream_chat, tagged


def run_generate(engine, n: int, max_tokens: int) -> float:
    tok, model = engine.tokenizer, engine.model
    tok.padding_side = "left"
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in tagged(n)
    ]
    enc = tok(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=engine.pad_id)
    elapsed = time.perf_counter() - start
    produced = 0
    for row in out[:, enc["input_ids"].shape[1] :].tolist():
        for token in row:
            produced += 1
            if token in engine.eos_ids:
                break
    return produced / elapsed


async def run_engine(engine, n: int, max_tokens: int) -> tuple[float, float]:
    from cyllm.worker.engines.types import Finished, GenerationRequest, SamplingParams, TextDelta

    ttfts: list[float] = []

    async def one(i: int, prompt: str) -> int:
        t0 = time.perf_counter()
        first = True
        async for ev in engine.generate(
            GenerationRequest(
                f"b{n}-{i}",
                messages=(("user", prompt),),
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0),
            )
        ):
            if isinstance(ev, TextDelta) and first:
                ttfts.append(time.perf_counter() - t0)
                first = False
            if isinstance(ev, Finished):
                return ev.completion_tokens
        return 0

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(tagged(n))))
    return sum(counts) / (time.perf_counter() - start), statistics.median(ttfts)


async def run_stack(base: str, n: int, max_tokens: int) -> tuple[float, float]:
    return await stream_chat(base, MODEL, tagged(n), max_tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()

    import torch

    from cyllm.worker.engines.transformers_engine import TransformersEngine
    from cyllm.worker.model_files import resolve
    from cyllm.worker.settings import WorkerSettings, default_models

    torch.set_num_threads(args.threads)
    spec = default_models()[0]
    engine = TransformersEngine(spec, resolve(spec, WorkerSettings().cache_dir))

    env = {"CYLLM_WORKER_TORCH_THREADS": str(args.threads), "CYLLM_WORKER_CPU_ENGINE": "transformers"}

    async def measure(base: str) -> dict[int, tuple[float, float, float, float, float]]:
        await engine.load()
        out = {}
        for n in args.streams:  # the three methods of one row run back to back
            # on the engine's own thread, as the engine computes (compute_thread: why)
            gen = await engine.on_engine_thread(lambda n=n: run_generate(engine, n, args.max_tokens))
            eng, ttft = await run_engine(engine, n, args.max_tokens)
            st, st_ttft = await run_stack(base, n, args.max_tokens)
            out[n] = (gen, eng, ttft, st, st_ttft)
        await engine.close()
        return out

    with served(env=env) as base:
        results = asyncio.run(measure(base))

    rows = []
    for n in args.streams:
        gen, eng, ttft, st, st_ttft = results[n]
        rows.append(
            [
                n,
                gen,
                eng,
                st,
                f"{eng / gen:.2f}x",
                f"{st / eng:.2f}x",
                f"{ttft * 1000:.0f}",
                f"{st_ttft * 1000:.0f}",
            ]
        )
    print_table(
        f"tokens/s, {MODEL}, {args.max_tokens} new tokens/stream, {args.threads} torch threads",
        [
            "streams",
            "generate (padded)",
            "engine in-process",
            "full stack",
            "engine/generate",
            "stack/engine",
            "TTFT engine ms",
            "TTFT stack ms",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
