"""Real processes on real sockets with the real default model.

``cyllm serve`` is started once per session on free ports; it runs the coordinator,
the worker (transformers engine, SmolLM2-135M-Instruct) and the gateway as separate
processes.  It is stopped by its pid (SIGTERM, which stops its children).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import config_environment, free_ports

MODEL = "smollm2-135m-instruct"


@dataclass
class Server:
    base_url: str
    worker_address: str
    coordinator_address: str
    proc: subprocess.Popen


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{said(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{said(log)}")


def said(log: Path) -> str:
    """The end of serve's output and of its worker's log (``cyllm serve`` keeps the
    worker's output in ``logs/worker.log`` beside the state file, which is beside ``log``)."""
    worker = log.parent / "logs" / "worker.log"
    found = worker.read_text()[-3000:] if worker.exists() else "(none)"
    return f"{log.read_text()[-3000:]}\n--- {worker}:\n{found}"


def serve_command(config: Path | None = None, args: list[str] = ()) -> tuple[list[str], int, int, int]:
    """``cyllm serve`` on three free ports: the command, its HTTP, coordinator and worker ports."""
    http, coord, work = free_ports(3)
    cmd = [sys.executable, "-m", "cyllm", "serve", *args, "--port", str(http)]
    cmd += ["--coordinator-port", str(coord), "--worker-port", str(work)]
    return cmd + (["--config", str(config)] if config is not None else []), http, coord, work


@contextmanager
def serving(
    log: Path,
    config: Path | None = None,
    timeout: float = 300,
    env: dict[str, str | None] | None = None,
    args: list[str] = (),
) -> Iterator[Server]:
    """``cyllm serve`` (optionally with a config file, ``args`` such as a MODEL and its
    flags, and ``env`` changed: None removes a variable) on free ports, stopped by its pid."""
    cmd, http, coord, work = serve_command(config, args)
    # its own state file, beside its log, unless the test gives one (a restart keeps it);
    # what the config file sets, from the file
    env = {
        "CYLLM_COORDINATOR_STATE_DB": str(log.with_suffix(".state.db")),
        **config_environment(config),
        **(env or {}),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_environment(env),
        )
    base = f"http://127.0.0.1:{http}"
    try:
        wait_healthy(f"{base}/api/v1/health", proc, log, timeout)
        yield Server(base, f"127.0.0.1:{work}", f"127.0.0.1:{coord}", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _environment(changes: dict[str, str | None]) -> dict[str, str]:
    # without the test session's internal token: serve makes its own for the run
    env = {k: v for k, v in os.environ.items() if k != "CYLLM_INTERNAL_TOKEN"}
    env.update(
        {"PYTHONUNBUFFERED": "1", "CYLLM_COORDINATOR_METRICS_PORT": "0", "CYLLM_WORKER_METRICS_PORT": "0"}
    )
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("serve") / "serve.log") as s:
        yield s


DATA = Path(__file__).parents[1] / "data"


def secured_config(folder: Path) -> Path:
    """A config with authentication on, uploads, datasets and training in ``folder``."""
    config = folder / "cyllm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "gateway": {"auth_enabled": True, "api_keys_file": str(folder / "keys.json")},
                "coordinator": {"files_dir": str(folder / "files"), "datasets_dirs": [str(DATA)]},
                "worker": {"training_dir": str(folder / "jobs")},
            }
        )
    )
    return config


def create_key(config: Path, name: str, admin: bool = False) -> str:
    """A key made with ``cyllm keys create`` on the config's store (printed once)."""
    out = subprocess.run(
        [sys.executable, "-m", "cyllm", "keys", "create", "--name", name, "--config", str(config)]
        + (["--admin"] if admin else []),
        check=True,
        capture_output=True,
        text=True,
        env=_environment(config_environment(config)),
    ).stdout
    return out.strip().splitlines()[-1]


def children(pid: int) -> dict[str, int]:
    """serve's children by component name (from their command lines)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            for name in ("worker", "gateway"):
                if name.encode() in argv[3:5]:
                    out[name] = int(child)
    return out


def comes_back(server, name: str, dead: int) -> None:
    """Wait until ``name`` runs again under a new pid and the service is healthy."""
    deadline = time.monotonic() + 240
    status = None
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"serve went down with its {name}"
        try:
            status = httpx.get(f"{server.base_url}/api/v1/health", timeout=3).json()["status"]
        except httpx.HTTPError:
            status = None
        new = children(server.proc.pid).get(name)
        if status == "ok" and new not in (None, dead):
            break
        time.sleep(1)
    assert status == "ok"
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        timeout=60,
        json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200, r.text
