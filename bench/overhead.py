"""The stack's own overhead, with the zero-cost fake engine (a test double).

Direct: ``FakeEngine.generate`` called in-process.  Stack: the same engine behind
``cyllm serve`` (gateway -> coordinator -> worker, three processes, gRPC over
loopback), non-streaming ``/v1/completions`` over HTTP, once with the in-memory
coordinator backend and once with the Redis one (a redis-server started here).  All
run the same number of requests, one at a time and ``--concurrency`` at a time; added
latency is the stack's percentile minus the direct one.

    python bench/overhead.py [--requests 400] [--concurrency 16] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from bench.common import print_table, redis_server, served


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def drive(call, requests: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return requests / (time.perf_counter() - start), latencies


async def direct(requests: int, concurrency: int, tokens: int):
    from cyllm.worker.engines.fake import FakeEngine
    from cyllm.worker.engines.types import GenerationRequest, SamplingParams
    from cyllm.worker.settings import ModelSpec

    engine = FakeEngine(ModelSpec(id="fake", engine="fake"))
    await engine.load()

    async def call(i: int) -> None:
        req = GenerationRequest(
            f"d{i}", prompt="hello world", sampling=SamplingParams(max_tokens=tokens, temperature=1.0)
        )
        async for _ in engine.generate(req):
            pass

    return await drive(call, requests, concurrency)


async def through_stack(base: str, requests: int, concurrency: int, tokens: int):
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as http:

        async def call(i: int) -> None:
            r = await http.post(
                f"{base}/v1/completions",
                json={"model": "fake", "prompt": "hello world", "max_tokens": tokens, "temperature": 1.0},
            )
            r.raise_for_status()

        await call(-1)  # warm the connections
        return await drive(call, requests, concurrency)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    rows = []
    models = "models:\n  - id: fake\n    engine: fake\n    max_batch_size: 256\n"
    with redis_server() as url, tempfile.TemporaryDirectory() as tmp:
        for backend, extra in (("memory", ""), ("redis", f"coordinator:\n  redis_url: {url}\n")):
            cfg = Path(tmp) / f"{backend}.yaml"
            cfg.write_text(models + extra)
            with served(cfg) as base:
                for conc in (1, args.concurrency):
                    d_rps, d_lat = asyncio.run(direct(args.requests, conc, args.tokens))
                    s_rps, s_lat = asyncio.run(through_stack(base, args.requests, conc, args.tokens))
                    rows.append(
                        [
                            backend,
                            conc,
                            d_rps,
                            s_rps,
                            (pct(s_lat, 50) - pct(d_lat, 50)) * 1000,
                            (pct(s_lat, 99) - pct(d_lat, 99)) * 1000,
                        ]
                    )
    print_table(
        f"stack overhead, fake engine, {args.tokens} tokens/request, {args.requests} requests",
        ["backend", "concurrency", "direct req/s", "stack req/s", "added p50 ms", "added p99 ms"],
        rows,
    )


if __name__ == "__main__":
    main()
