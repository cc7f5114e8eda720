"""``cyllm serve``: the embedded default, all three components on one machine.

Each component runs as its own process (``cyllm coordinator``, ``cyllm worker``,
``cyllm gateway``) talking gRPC over loopback, so the path that runs here is the path
that runs in a distributed deployment.  The supervisor starts them in order, stops
them all (by pid) when one exits or on SIGINT/SIGTERM, and exits with the first
failure's code.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


def _cmd(component: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "cyllm", component, *args]


def run(host: str, port: int, coordinator_port: int, worker_port: int,
        config: Path | None) -> int:
    cfg = ["--config", str(config)] if config else []
    coordinator = f"127.0.0.1:{coordinator_port}"
    specs = [
        ("coordinator", _cmd("coordinator", "--host", "127.0.0.1", "--port", str(coordinator_port), *cfg)),
        ("worker", _cmd("worker", "--host", "127.0.0.1", "--port", str(worker_port),
                        "--coordinator", coordinator, *cfg)),
        ("gateway", _cmd("gateway", "--host", host, "--port", str(port),
                         "--coordinator", coordinator, *cfg)),
    ]
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def _stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    code = 0
    try:
        for name, cmd in specs:
            procs.append((name, subprocess.Popen(cmd)))
        while not stopping:
            for name, proc in procs:
                rc = proc.poll()
                if rc is not None:
                    print(f"cyllm serve: {name} exited with code {rc}; stopping", file=sys.stderr)
                    code = rc or 1
                    stopping = True
                    break
            time.sleep(0.2)
    finally:
        _terminate([p for _, p in reversed(procs)])
    return code


def _terminate(procs: list[subprocess.Popen], timeout: float = 20.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
