"""CPU time per request of each ``cyllm serve`` process, this tree against another
checkout of the project (a refactor's same-minute A/B).

Wall-clock latency on a shared 2-core machine swings by a tenth from one minute to the
next; the CPU a process spends per request (``/proc/PID/stat``, user + system) does not
depend on what else runs.  Both trees serve the zero-cost fake engine (a test double)
at once; each round sends 16-token completions (sampled, so the prompt cache keeps
none) one at a time and 64 at a time to each in turn, the order reversed every other
round, and reads every process's CPU before and after.

    git worktree add /tmp/base REV
    python bench/cpu_per_request.py --baseline /tmp/base [--rounds 4] [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

import aiohttp

from bench.common import checkout_env, free_ports, print_table, process, state_in

HERE = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids += [int(entry.name), *descendants(int(entry.name))]
    return kids


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    return next((a for a in argv if a in ("gateway", "worker", "coordinator")), argv[-1])


async def load(base: str, requests: int, concurrency: int) -> None:
    queue = list(range(requests))

    async def one(http: aiohttp.ClientSession) -> None:
        while queue:
            body = {"model": "fake", "prompt": f"p{queue.pop()}", "max_tokens": 16, "temperature": 1.0}
            async with http.post(f"{base}/v1/completions", json=body) as r:
                r.raise_for_status()
                await r.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        await asyncio.gather(*(one(http) for _ in range(concurrency)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of another revision")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    trees = {"this tree": HERE, "baseline": args.baseline.resolve()}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as up:
        config = Path(tmp) / "fake.yaml"
        config.write_text(
            "models:\n  - id: fake\n    engine: fake\n    max_batch_size: 256\n"
            "coordinator:\n  cache_ttl_s: 0\n"
        )
        servers = {}
        for name, tree in trees.items():
            http, coordinator, worker = free_ports(3)
            base = f"http://127.0.0.1:{http}"
            proc = up.enter_context(
                process(
                    [
                        sys.executable,
                        "-m",
                        "cyllm",
                        "serve",
                        "--port",
                        str(http),
                        "--coordinator-port",
                        str(coordinator),
                        "--worker-port",
                        str(worker),
                        "--config",
                        str(config),
                    ],
                    f"{base}/api/v1/health",
                    {
                        **checkout_env(tree),
                        "CYLLM_COORDINATOR_METRICS_PORT": "0",
                        "CYLLM_WORKER_METRICS_PORT": "0",
                        **state_in(up.enter_context(tempfile.TemporaryDirectory(prefix="cyllm-bench-"))),
                    },
                )
            )
            servers[name] = (proc, base)
        rows = []
        for concurrency in (1, 64):
            spent: dict[tuple[str, str], list[float]] = {}
            for r in range(args.rounds):
                for name in list(servers) if r % 2 == 0 else list(servers)[::-1]:
                    proc, base = servers[name]
                    asyncio.run(load(base, args.requests // 5, concurrency))  # warm
                    pids = descendants(proc.pid)
                    before = {p: cpu_s(p) for p in pids}
                    asyncio.run(load(base, args.requests, concurrency))
                    for p in pids:
                        ms = (cpu_s(p) - before[p]) / args.requests * 1000
                        spent.setdefault((role(p), name), []).append(ms)
            for (who, name), values in sorted(spent.items()):
                rows.append(
                    [
                        concurrency,
                        who,
                        name,
                        f"{statistics.median(values):.3f}",
                        f"{min(values):.3f}-{max(values):.3f}",
                    ]
                )
    print_table(
        f"CPU ms per 16-token request (fake engine), median of {args.rounds} alternating rounds",
        ["concurrency", "process", "tree", "CPU ms", "rounds"],
        rows,
    )


if __name__ == "__main__":
    main()
