"""Chaos: a fixed mixed load on a distributed stack while machines die.

Separate processes: Redis (AOF), two coordinators, three workers (each registered with
both coordinators) and a gateway given both coordinators.  ``--concurrency`` clients
send greedy completions (every other one streamed) for ``--duration`` seconds, first
undisturbed, then while a chaos loop SIGKILLs a random worker or coordinator every
``--kill-every`` seconds and starts it again (same id, same port) a moment later.

Reported per phase: requests served and failed, answers whose text differs from the
undisturbed greedy reference, words duplicated or missing in those (a diff against the
reference), and p50/p99 latency.  ``--engine fake`` (default) runs the plumbing with
the zero-cost test engine; ``--engine transformers`` the default model (in float32,
whose greedy text does not depend on the batch around it).

    python bench/chaos.py                       # fake engine, 60 s per phase
    python bench/chaos.py --engine transformers --duration 60 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script

import httpx
import yaml

from bench.common import MODEL, free_ports, print_table
from cyllm.worker.settings import DEFAULT_GGUF

# Raw completions (the plain API every engine serves): openings a model goes on with.
PROMPTS = [
    f"Once upon a time, there was {t}. Every morning,"
    for t in ("a dragon", "a lighthouse keeper", "a talking cat", "a clockmaker", "a robot", "a fox")
]


@dataclass
class Result:
    ok: bool
    text: str
    latency: float
    prompt: str
    error: str = ""


@dataclass
class Stack:
    """The processes, each started again on demand with the same arguments."""

    tmp: Path
    engine: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    args: dict[str, list[str]] = field(default_factory=dict)
    kills: int = 0
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # the internal plane's

    def start(self, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            self.args[name],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "CYLLM_INTERNAL_TOKEN": self.token},
        )

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.kills += 1

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def build(tmp: Path, engine: str, *, progress_timeout_s: float, workers: int = 3) -> tuple[Stack, str]:
    """Configure every process of the stack (nothing started); returns it and the API URL."""
    stack = Stack(tmp, engine)
    redis_port, http, *ports = free_ports(4 + workers)
    (tmp / "redis").mkdir(exist_ok=True)
    stack.args["redis"] = [
        "redis-server",
        "--port",
        str(redis_port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes",
        "--dir",
        str(tmp / "redis"),
    ]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    coordinators = []
    fast = {
        "heartbeat_interval_s": 0.3,
        "heartbeat_timeout_s": 1.5,
        "lease_s": 2.0,
        "progress_timeout_s": progress_timeout_s,
        "breaker_cooldown_s": 2.0,
        "metrics_port": 0,
        "cache_ttl_s": 0,
    }  # every request generates: greedy repeats would be cache hits
    for i, port in enumerate(ports[:2], 1):
        name = f"c{i}"
        coordinators.append(f"127.0.0.1:{port}")
        stack.args[name] = _cyllm(
            tmp,
            name,
            {"coordinator": {**fast, "coordinator_id": name}},
            "coordinator",
            "--port",
            str(port),
            "--redis-url",
            redis_url,
        )
    # The fake engine, or the default model on ``engine``, in float32: greedy text is
    # compared with an undisturbed run, and only float32 on CPU gives the same argmax
    # whatever the batch around a sequence (bfloat16 flips near-ties between batches,
    # with or without a failover).
    if engine == "fake":
        model = {"id": "fake", "engine": "fake", "max_batch_size": 32, "engine_args": {"token_delay_s": 0.02}}
    else:
        model = {"id": MODEL, "engine": engine, "gguf": DEFAULT_GGUF, "temperature": 0.0, "dtype": "float32"}
    models = {"models": [model]}
    for i, port in enumerate(ports[2:], 1):
        name = f"w{i}"
        args = ["worker", "--port", str(port)]
        for c in coordinators:
            args += ["--coordinator", c]
        stack.args[name] = _cyllm(
            tmp, name, {"worker": {"worker_id": name, "metrics_port": 0}, **models}, *args
        )
    args = ["gateway", "--port", str(http)]
    for c in coordinators:
        args += ["--coordinator", c]
    stack.args["gateway"] = _cyllm(tmp, "gateway", {}, *args)
    return stack, f"http://127.0.0.1:{http}"


def _cyllm(tmp: Path, name: str, config: dict, *args: str) -> list[str]:
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return [sys.executable, "-m", "cyllm", *args, "--config", str(tmp / f"{name}.yaml")]


def start_all(stack: Stack, base: str, timeout: float = 300) -> None:
    for name in stack.args:
        stack.start(name)
        if name == "redis":
            time.sleep(0.5)
    workers = {n for n in stack.args if n.startswith("w")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [n for n, p in stack.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited; logs in {stack.tmp}")
        try:
            h = httpx.get(f"{base}/api/v1/health", timeout=2).json()
            if {w["id"] for w in h.get("workers", []) if w["healthy"]} == workers:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError("the stack did not become healthy; logs in " + str(stack.tmp))


async def ask(
    http: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int, stream: bool
) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    try:
        if not stream:
            r = await http.post(f"{base}/v1/completions", json=body)
            if r.status_code != 200:
                return Result(
                    False, "", time.perf_counter() - started, prompt, f"{r.status_code} {r.text[:200]}"
                )
            return Result(True, r.json()["choices"][0]["text"], time.perf_counter() - started, prompt)
        text = []
        async with http.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return Result(
                    False,
                    "",
                    time.perf_counter() - started,
                    prompt,
                    f"{r.status_code} {(await r.aread())[:200]!r}",
                )
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(
                        False,
                        "".join(text),
                        time.perf_counter() - started,
                        prompt,
                        f"stream error {chunk['error'].get('message', '')[:200]}",
                    )
                text += [c["text"] for c in chunk["choices"]]
        return Result(True, "".join(text), time.perf_counter() - started, prompt)
    except httpx.HTTPError as exc:
        return Result(False, "", time.perf_counter() - started, prompt, f"{type(exc).__name__}: {exc}")


async def load(
    base: str,
    model: str,
    *,
    duration: float,
    concurrency: int,
    max_tokens: int,
    chaos: Stack | None = None,
    kill_every: float = 4.0,
    restart_after: float = 1.0,
    seed: int = 0,
) -> list[Result]:
    """``concurrency`` clients in a loop for ``duration`` s; with ``chaos``, a random
    worker or coordinator killed every ``kill_every`` s and restarted after ``restart_after``."""
    results: list[Result] = []
    deadline = time.monotonic() + duration
    rng = random.Random(seed)

    async def client(i: int) -> None:
        n = 0
        async with httpx.AsyncClient(timeout=300) as http:
            while time.monotonic() < deadline:
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                results.append(await ask(http, base, model, prompt, max_tokens, stream=(i + n) % 2 == 0))
                n += 1

    async def monkey() -> None:
        assert chaos is not None
        victims = [n for n in chaos.args if n[0] in "cw" and n[1:].isdigit()]
        while time.monotonic() + kill_every < deadline:
            await asyncio.sleep(kill_every)
            victim = rng.choice(victims)
            chaos.kill(victim)
            await asyncio.sleep(restart_after)
            chaos.start(victim)

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    if chaos is not None:
        tasks.append(asyncio.create_task(monkey()))
    await asyncio.gather(*tasks)
    return results


async def references(base: str, model: str, max_tokens: int, prompts: list[str] = PROMPTS) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=300) as http:
        answers = [await ask(http, base, model, p, max_tokens, stream=False) for p in prompts]
    bad = [a for a in answers if not a.ok]
    if bad:
        raise RuntimeError(f"reference run failed: {bad[0].error}")
    return {a.prompt: a.text for a in answers}


@dataclass
class Summary:
    requests: int
    served: int
    failed: int
    corrupted: int
    duplicated: int  # words in served answers beyond the reference
    missing: int  # reference words absent from served answers
    p50: float
    p99: float
    errors: list[str]


def summarize(results: list[Result], reference: dict[str, str]) -> Summary:
    served = [r for r in results if r.ok]
    corrupted = [r for r in served if r.text != reference[r.prompt]]
    duplicated = missing = 0
    for r in corrupted:
        want, got = reference[r.prompt].split(), r.text.split()
        for op, a1, a2, b1, b2 in difflib.SequenceMatcher(a=want, b=got, autojunk=False).get_opcodes():
            if op in ("insert", "replace"):
                duplicated += b2 - b1
            if op in ("delete", "replace"):
                missing += a2 - a1
    lat = sorted(r.latency for r in served) or [0.0]
    return Summary(
        len(results),
        len(served),
        len(results) - len(served),
        len(corrupted),
        duplicated,
        missing,
        _pct(lat, 50),
        _pct(lat, 99),
        [r.error for r in results if not r.ok][:5],
    )


def _pct(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]


def run(
    engine: str,
    duration: float,
    concurrency: int,
    max_tokens: int,
    kill_every: float,
    seed: int = 0,
    tmp: Path | None = None,
) -> tuple[Summary, Summary, int]:
    """Both phases on one stack: (undisturbed, chaos, kills)."""
    with tempfile.TemporaryDirectory() as scratch:
        stack, base = build(
            tmp or Path(scratch), engine, progress_timeout_s=3.0 if engine == "fake" else 20.0
        )
        model = "fake" if engine == "fake" else MODEL
        try:
            start_all(stack, base)
            reference = asyncio.run(references(base, model, max_tokens))
            calm = asyncio.run(
                load(base, model, duration=duration, concurrency=concurrency, max_tokens=max_tokens)
            )
            storm = asyncio.run(
                load(
                    base,
                    model,
                    duration=duration,
                    concurrency=concurrency,
                    max_tokens=max_tokens,
                    chaos=stack,
                    kill_every=kill_every,
                    seed=seed,
                )
            )
            return summarize(calm, reference), summarize(storm, reference), stack.kills
        finally:
            stack.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="fake", help="fake (default) or transformers")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--kill-every", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    calm, storm, kills = run(
        args.engine, args.duration, args.concurrency, args.max_tokens, args.kill_every, args.seed
    )
    rows = [
        [name, s.requests, s.served, s.failed, s.corrupted, s.duplicated, s.missing, s.p50, s.p99]
        for name, s in (("undisturbed", calm), (f"chaos ({kills} kills)", storm))
    ]
    print_table(
        f"chaos: engine {args.engine}, {args.concurrency} clients, {args.max_tokens} greedy tokens, "
        f"{args.duration:g} s per phase, a SIGKILL every {args.kill_every:g} s",
        [
            "phase",
            "requests",
            "served",
            "failed",
            "corrupted",
            "words dup.",
            "words missing",
            "p50 s",
            "p99 s",
        ],
        [[f"{v:.2f}" if isinstance(v, float) else v for v in row] for row in rows],
    )
    for s in (calm, storm):
        for e in s.errors:
            print("error:", e)


if __name__ == "__main__":
    main()
