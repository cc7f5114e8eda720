"""Shared pieces of the benchmarks: prompts, a served stack, table printing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

MODEL = "smollm2-135m-instruct"
TOPICS = ["dragons", "the sea", "a lost key", "robots", "a mountain village", "the moon", "a clockmaker",
          "a desert caravan", "an old library", "winter", "a lighthouse", "a chess match",
          "a river journey", "a talking cat", "a storm", "a garden", "a train station", "a volcano",
          "a detective", "a bakery", "an island", "a comet", "a forest", "a violin", "a market",
          "a bridge", "a snowstorm", "a ship", "a castle", "a painter", "a city at night", "a fox"]


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


@contextmanager
def served(config: Path | None = None, env: dict[str, str] | None = None):
    """``cyllm serve`` on free ports; yields the base URL; stopped by pid."""
    http, coord, work = free_ports(3)
    cmd = [sys.executable, "-m", "cyllm", "serve", "--port", str(http),
           "--coordinator-port", str(coord), "--worker-port", str(work)]
    if config:
        cmd += ["--config", str(config)]
    metrics = {"CYLLM_COORDINATOR_METRICS_PORT": "0", "CYLLM_WORKER_METRICS_PORT": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **metrics, **(env or {})})
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("cyllm serve exited")
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[f"{v:.1f}" if isinstance(v, float) else str(v) for v in r])
    Console(width=160).print(table)
