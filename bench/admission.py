"""Admissions per second through the gateway's limits on a shared Redis, this tree
against another checkout of the project (a refactor's same-minute A/B).

What every generation pays at its start and end when gateways share Redis: the
tokens-per-minute reservation, the generation slot and a budget's reservation, then
their settlement.  Each tree runs in its own process against one ``redis-server``
started here (its own port, no persistence), one caller, ``--concurrency`` requests at
a time for ``--seconds``; the trees take turns, the order reversed every other round,
and the ratio is taken round by round.

    git worktree add /tmp/base REV
    python bench/admission.py --baseline /tmp/base [--rounds 6] [--seconds 5] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

from bench.common import checkout_env, free_ports, print_table

HERE = Path(__file__).resolve().parents[1]

# Run in each tree's own interpreter: its RateLimiter, on the shared Redis.
LOOP = """
import asyncio, json, sys, time
from cyllm.gateway.auth import Identity
from cyllm.gateway.budgets import Budget
from cyllm.gateway.ratelimit import RateLimiter
from cyllm.gateway.settings import GatewaySettings

url, seconds, concurrency, caller = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

async def seed(subject, since):
    return 0, 0.0

async def main():
    limiter = RateLimiter(
        GatewaySettings(redis_url=url, rate_limit_tpm=10**9, rate_limit_concurrency=10**6), seed
    )
    who = Identity(caller, "api_key", budget=Budget(tokens_per_day=10**15, tokens_per_month=10**15))
    done = 0
    end = time.monotonic() + seconds

    async def one():
        nonlocal done
        while time.monotonic() < end:
            adm = await limiter.admit(who, 40)
            await limiter.finish(adm, 30)
            done += 1

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    import cyllm
    print(json.dumps({"per_s": done / (time.monotonic() - start), "tree": cyllm.__file__}))
    await limiter.close()

asyncio.run(main())
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of another revision")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    trees = {"this tree": HERE, "baseline": args.baseline.resolve()}
    (port,) = free_ports(1)
    with tempfile.TemporaryDirectory() as tmp:
        redis = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(port), "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            rates: dict[str, list[float]] = {name: [] for name in trees}
            for r in range(args.rounds):
                for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                    out = subprocess.run(
                        [
                            sys.executable,
                            "-c",
                            LOOP,
                            f"redis://127.0.0.1:{port}",
                            str(args.seconds),
                            str(args.concurrency),
                            f"key:bench-{r}-{name.replace(' ', '-')}",
                        ],
                        env={**os.environ, **checkout_env(trees[name])},
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    assert result["tree"].startswith(str(trees[name])), result  # that tree's code
                    rates[name].append(result["per_s"])
        finally:
            redis.terminate()
            redis.wait(10)
    ratios = [a / b for a, b in zip(rates["this tree"], rates["baseline"])]
    print_table(
        f"admit + finish per second, {args.concurrency} at a time, one caller with a TPM limit, "
        f"a slot and a budget, on one Redis; median of {args.rounds} rounds",
        ["this tree /s", "baseline /s", "ratio (median of rounds)", "ratio min", "ratio max"],
        [
            [
                statistics.median(rates["this tree"]),
                statistics.median(rates["baseline"]),
                f"{statistics.median(ratios):.2f}",
                f"{min(ratios):.2f}",
                f"{max(ratios):.2f}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
