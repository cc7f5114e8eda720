"""How one coordinator's placement scales with the pool: 1, 10 and 100 workers, with
the in-memory backend and with Redis.

The coordinator runs in this process (so its Redis round trips can be counted); one
real ``cyllm worker`` process with the zero-cost fake engine (a test double) serves
every generation, and the other workers of the pool are records registered and
heartbeated here at the same address, so the coordinator places among N workers while
the cost of the generations stays the same.  A load process calls the coordinator's
``Generate`` over gRPC (sampled 16-token requests, which the prompt cache never keeps,
and greedy ones with distinct prompts, which it stores), one at a time and 64 at a
time, and the same calls straight to the worker (on its session, as a coordinator
sends them): the difference is what placement
adds.  Redis round trips are counted per request (those made while serving it) and
in all (housekeeping, heartbeats and the dispatch included), divided by the requests;
so is the redis-server's CPU time (its ``INFO cpu``), which sets the cluster's ceiling:
one Redis core serves about 1e6 / (µs per request) requests a second, whatever the
number of coordinators in front of it.

    python bench/coordination.py [--requests 400] [--workers 1,10,100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

TOKEN = "bench-internal-token-0123456789"
os.environ["CYLLM_INTERNAL_TOKEN"] = TOKEN

from bench.common import free_port, print_table, redis_server  # noqa: E402

CONCURRENCY = (1, 64)

# -- the load process -------------------------------------------------------------------


async def load(address: str, requests: int, concurrency: int, greedy: bool, tag: str) -> dict:
    from cyllm.coordinator.workers import WorkerClients
    from cyllm.protocol import pb, rpc
    from cyllm.protocol.plane import Plane

    channel = Plane(TOKEN).channel(address)
    workers = WorkerClients(Plane(TOKEN))
    if "coordinator" in tag:
        stub = rpc.InferenceStub(channel)
        call = stub.Generate
    else:  # as a coordinator calls a worker: a call on its session

        def call(req):
            return workers.generate(address, req, req.request_id)

    latencies: list[float] = []
    todo = list(range(requests))

    async def one(i: int) -> None:
        req = pb.GenerateRequest(
            request_id=f"{tag}-{i}",
            model="fake",
            prompt=f"{tag} prompt {i}",
            sampling=pb.SamplingParams(max_tokens=16, temperature=0.0 if greedy else 1.0),
        )
        t0 = time.perf_counter()
        async for _ in call(req):
            pass
        latencies.append(time.perf_counter() - t0)

    async def runner() -> None:
        while todo:
            await one(todo.pop())

    for i in range(8):  # warm the channel
        await one(-1 - i)
    latencies.clear()
    start = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    await channel.close()
    await workers.close()
    return {"rps": requests / elapsed, "p50": statistics.median(latencies)}


def run_load(address: str, requests: int, concurrency: int, greedy: bool, tag: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load",
            address,
            "--requests",
            str(requests),
            "--concurrency",
            str(concurrency),
            "--tag",
            tag,
        ]
        + (["--greedy"] if greedy else []),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- counting Redis round trips ----------------------------------------------------------

COUNTS = {"all": 0, "requests": 0}


def count_round_trips() -> None:
    """Every command or pipeline redis-py sends is one round trip: count them, and those
    sent on a request's own path (its ``Generate`` or its lease renewals on the stack)."""
    from redis.asyncio.connection import AbstractConnection

    from cyllm.coordinator.services.inference import InferenceService, WorkerSlots

    send = AbstractConnection.send_packed_command
    ours = {InferenceService.Generate.__code__, WorkerSlots._renew.__code__}

    def on_request_path() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code in ours:
                return True
            frame = frame.f_back
        return False

    async def counted(self, command, check_health=True):
        COUNTS["all"] += 1
        COUNTS["requests"] += on_request_path()
        return await send(self, command, check_health)

    AbstractConnection.send_packed_command = counted


# -- the pool ----------------------------------------------------------------------------


@asynccontextmanager
async def coordinator(redis_url: str | None, tmp: Path):
    from cyllm.coordinator.main import CoordinatorServer
    from cyllm.coordinator.settings import CoordinatorSettings
    from cyllm.protocol.plane import Plane

    settings = CoordinatorSettings(
        host="127.0.0.1",
        port=0,
        redis_url=redis_url,
        metrics_port=0,
        files_dir=tmp / "files",
        state_db=tmp / "state.db",  # not the user's
        queue_max_size=100_000,
    )
    server = CoordinatorServer(settings, Plane(TOKEN))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def worker_process(coordinator_port: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = tmp / "worker.yaml"
    cfg.write_text("models:\n  - id: fake\n    engine: fake\n    max_batch_size: 256\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cyllm",
            "worker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--coordinator",
            f"127.0.0.1:{coordinator_port}",
            "--config",
            str(cfg),
        ],
        env={**os.environ, "CYLLM_WORKER_METRICS_PORT": "0", "CYLLM_WORKER_CACHE_DIR": str(tmp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, port


async def pool_of(server, n: int) -> asyncio.Task[None]:
    """Wait for the real worker, add ``n - 1`` records at its address, keep them beating."""
    from cyllm.protocol import pb

    deadline = time.monotonic() + 120
    while not (views := await server.scheduler.workers()):
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not register")
        await asyncio.sleep(0.2)
    real = views[0].record.info
    others = [f"{real.worker_id}-copy{i}" for i in range(1, n)]
    for wid in others:
        info = pb.WorkerInfo()
        info.CopyFrom(real)
        info.worker_id = wid
        await server.scheduler.register(info)

    async def beat() -> None:
        while True:
            await asyncio.sleep(1.0)
            for wid in others:
                await server.scheduler.heartbeat(wid, 0, 0)

    return asyncio.create_task(beat())


async def redis_cpu(url: str | None) -> float:
    """CPU seconds the redis-server has used (user + system), 0 without Redis."""
    if not url:
        return 0.0
    import redis.asyncio as aioredis

    async with aioredis.from_url(url) as r:
        info = await r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(backend: str, redis_url: str | None, sizes: list[int], requests: int) -> list[list]:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            if redis_url:
                import redis.asyncio as aioredis

                async with aioredis.from_url(redis_url) as r:
                    await r.flushdb()
            async with coordinator(redis_url, tmp) as server:
                proc, worker_port = worker_process(server.port, tmp)
                beating = await pool_of(server, n)
                try:
                    for conc in CONCURRENCY:
                        for greedy in (False, True):
                            kind = "greedy (cached)" if greedy else "sampled"
                            tag = f"coordinator-{backend}-{n}-{conc}-{greedy}"
                            direct = await asyncio.to_thread(
                                run_load,
                                f"127.0.0.1:{worker_port}",
                                requests,
                                conc,
                                greedy,
                                tag.replace("coordinator", "worker"),
                            )
                            before, cpu = dict(COUNTS), await redis_cpu(redis_url)
                            placed = await asyncio.to_thread(
                                run_load, f"127.0.0.1:{server.port}", requests, conc, greedy, tag
                            )
                            cpu = await redis_cpu(redis_url) - cpu
                            total = requests + 8  # the warm-up calls
                            per_request = (COUNTS["requests"] - before["requests"]) / total
                            overall = (COUNTS["all"] - before["all"]) / total
                            rows.append(
                                [
                                    backend,
                                    n,
                                    conc,
                                    kind,
                                    placed["rps"],
                                    direct["rps"],
                                    f"{placed['rps'] / direct['rps']:.2f}x",
                                    placed["p50"] * 1000,
                                    direct["p50"] * 1000,
                                    f"{per_request:.2f}" if redis_url else "-",
                                    f"{overall:.2f}" if redis_url else "-",
                                    f"{cpu / total * 1e6:.0f}" if redis_url else "-",
                                ]
                            )
                finally:
                    beating.cancel()
                    proc.terminate()
                    proc.wait(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--workers", default="1,10,100")
    ap.add_argument("--load")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.load:
        print(
            json.dumps(asyncio.run(load(args.load, args.requests, args.concurrency, args.greedy, args.tag)))
        )
        return
    import logging

    logging.disable(logging.INFO)
    count_round_trips()
    sizes = [int(n) for n in args.workers.split(",")]
    rows = asyncio.run(measure("memory", None, sizes, args.requests))
    with redis_server() as url:
        rows += asyncio.run(measure("redis", url, sizes, args.requests))
    print_table(
        f"one coordinator placing 16-token requests (fake engine), {args.requests} per row",
        [
            "backend",
            "workers",
            "concurrency",
            "requests",
            "placed req/s",
            "direct req/s",
            "ratio",
            "p50 ms placed",
            "p50 ms direct",
            "Redis trips/request",
            "Redis trips/request (all)",
            "Redis CPU µs/request",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
