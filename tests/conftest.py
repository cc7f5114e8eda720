"""Fixtures shared by the tiers: a real redis-server on an ephemeral port.

Every component needs internal-plane credentials; the test session has one token, in
the environment, so in-process servers and spawned processes share it (tests of the
plane's authentication make their own)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time

import pytest
import redis

os.environ.setdefault("CYLLM_INTERNAL_TOKEN", secrets.token_urlsafe(24))


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together while chosen, so none repeats)."""
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.create_server(("127.0.0.1", 0))) for _ in range(n)]
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]



@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """``redis-server`` started for this test session, stopped by its pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server; .ci/run does this)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield url
    client.close()
    proc.terminate()
    proc.wait(10)


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
