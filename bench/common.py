"""Shared pieces of the benchmarks: prompts, a served stack, table printing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

MODEL = "smollm2-135m-instruct"
TOPICS = [
    "dragons",
    "the sea",
    "a lost key",
    "robots",
    "a mountain village",
    "the moon",
    "a clockmaker",
    "a desert caravan",
    "an old library",
    "winter",
    "a lighthouse",
    "a chess match",
    "a river journey",
    "a talking cat",
    "a storm",
    "a garden",
    "a train station",
    "a volcano",
    "a detective",
    "a bakery",
    "an island",
    "a comet",
    "a forest",
    "a violin",
    "a market",
    "a bridge",
    "a snowstorm",
    "a ship",
    "a castle",
    "a painter",
    "a city at night",
    "a fox",
]


def prompts(n: int) -> list[str]:
    return [f"Write a long story about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open while choosing, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def tagged(n: int) -> list[str]:
    # A tag per stream count, so a prompt cache never answers from an earlier row; every
    # server and method of one row gets exactly the same prompts.
    return [f"{p} ({n} streams)" for p in prompts(n)]


@contextmanager
def process(cmd: list[str], health: str, env: dict[str, str] | None = None, timeout: float = 600):
    """``cmd`` started, waited for until ``health`` answers 200 (not at all when empty),
    stopped by its pid."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    try:
        deadline = time.monotonic() + timeout
        while health:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}")
            try:
                if httpx.get(health, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{health} not up after {timeout:g}s")
            time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def redis_server():
    """A throwaway redis-server on a free port (no persistence); yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def served(config: Path | None = None, env: dict[str, str] | None = None):
    """``cyllm serve`` on free ports; yields the base URL; stopped by pid."""
    http, coord, work = free_ports(3)
    cmd = [
        sys.executable,
        "-m",
        "cyllm",
        "serve",
        "--port",
        str(http),
        "--coordinator-port",
        str(coord),
        "--worker-port",
        str(work),
    ]
    if config:
        cmd += ["--config", str(config)]
    metrics = {"CYLLM_COORDINATOR_METRICS_PORT": "0", "CYLLM_WORKER_METRICS_PORT": "0"}
    base = f"http://127.0.0.1:{http}"
    with tempfile.TemporaryDirectory(prefix="cyllm-bench-") as state:
        with process(
            cmd, f"{base}/api/v1/health", {**metrics, **state_in(state), **(env or {})}, timeout=300
        ):
            yield base


def checkout_env(tree: Path) -> dict[str, str]:
    """The environment that runs another checkout's code: on PYTHONPATH, and without the
    working directory first on sys.path (``python -m`` and ``-c`` put it there, and from
    this repository's root that is this tree's ``cyllm``, not the baseline's: an A/B of
    a tree against itself).  Checked here before any figure is taken."""
    env = {"PYTHONPATH": str(tree.resolve()), "PYTHONSAFEPATH": "1"}
    found = subprocess.run(
        [sys.executable, "-c", "import cyllm; print(cyllm.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not found.startswith(str(tree.resolve()) + os.sep):
        raise SystemExit(f"{tree}: python imports cyllm from {found}, not from that checkout")
    return env


def state_in(folder: str) -> dict[str, str]:
    """The environment that keeps a ``cyllm serve`` run's state (jobs, files, models,
    keys, usage) in ``folder``: a benchmark never writes to the user's own."""
    return {
        "CYLLM_COORDINATOR_STATE_DB": f"{folder}/state.db",
        "CYLLM_COORDINATOR_FILES_DIR": f"{folder}/files",
        "CYLLM_WORKER_TRAINING_DIR": f"{folder}/training",
        "CYLLM_GATEWAY_API_KEYS_FILE": f"{folder}/api-keys.json",
    }


async def stream_chat(base: str, model: str, texts: list[str], max_tokens: int) -> tuple[float, float]:
    """One streamed greedy chat per text, all at once, through an OpenAI-compatible
    server: (total completion tokens/s, TTFT p50 in s)."""
    ttfts: list[float] = []

    async def one(http: httpx.AsyncClient, text: str) -> int:
        body = {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": text}],
        }
        t0, usage, first = time.perf_counter(), 0, True
        async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                elif first and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttfts.append(time.perf_counter() - t0)
                    first = False
        return usage

    async with httpx.AsyncClient(timeout=900) as http:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(http, t) for t in texts))
        return sum(counts) / (time.perf_counter() - start), statistics.median(ttfts)


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r])
    Console(width=160).print(table)
