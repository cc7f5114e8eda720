"""Distributed mode with real processes: Redis, coordinators, workers and a gateway
started separately (``cyllm coordinator|worker|gateway``), the fake engine as workers'
model so that the tests are about the plumbing, not about the model."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_ports

pytestmark = pytest.mark.e2e

FAST = {"heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 1.5, "progress_timeout_s": 1.5,
        "lease_s": 2.0}


class Cluster:
    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp, self.redis_url = tmp, redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self._spare = free_ports(8)  # chosen together, so no two processes get the same

    def _start(self, name: str, args: list[str], config: dict) -> None:
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cyllm", *args, "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def coordinator(self, name: str, **kw) -> str:
        port = self.ports.get(name) or self.ports.setdefault(name, self._spare.pop())
        self._start(name, ["coordinator", "--port", str(port), "--redis-url", self.redis_url],
                    {"coordinator": {**FAST, "coordinator_id": name, "metrics_port": 0, **kw}})
        return f"127.0.0.1:{port}"

    def worker(self, name: str, coordinators: list[str], capacity: int = 1, **engine_args) -> str:
        port = self.ports.get(name) or self.ports.setdefault(name, self._spare.pop())
        args = ["worker", "--port", str(port)]
        for c in coordinators:
            args += ["--coordinator", c]
        self._start(name, args, {
            "worker": {"worker_id": name, "metrics_port": 0},
            "models": [{"id": "fake", "engine": "fake", "max_batch_size": capacity,
                        "engine_args": {"token_delay_s": 0.05, **engine_args}}],
        })
        return f"127.0.0.1:{port}"

    def gateway(self, coordinators: list[str]) -> str:
        port = self._spare.pop()
        args = ["gateway", "--port", str(port)]
        for c in coordinators:
            args += ["--coordinator", c]
        self._start("gateway", args, {})
        return f"http://127.0.0.1:{port}"

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.tmp.glob("*.log"))


@pytest.fixture
def cluster(tmp_path, redis_url):
    c = Cluster(tmp_path, redis_url)
    yield c
    c.stop_all()


def health(base: str) -> dict:
    try:
        return httpx.get(f"{base}/api/v1/health", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}


def wait_for(predicate, timeout: float, what: str, cluster: Cluster) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{cluster.logs()}")


def healthy_workers(base: str) -> set[str]:
    return {w["id"] for w in health(base).get("workers", []) if w["healthy"]}


def tokens_of(base: str, worker: str) -> int:
    """The worker's generated-token counter once it is idle and a heartbeat has told it."""
    last = None
    for _ in range(100):
        now = {w["id"]: (w["running"], w["tokensGenerated"]) for w in health(base)["workers"]}[worker]
        if now == last and now[0] == 0:
            return now[1]
        last = now
        time.sleep(0.5)  # more than a heartbeat interval (FAST: 0.3 s)
    raise AssertionError(f"worker {worker} did not settle: {last}")


async def ask_many(base: str, n: int, max_tokens: int, delay: float = 0.0) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as http:
        async def one(i: int) -> httpx.Response:
            await asyncio.sleep(delay * i)
            return await http.post(f"{base}/v1/completions", json={
                "model": "fake", "prompt": f"request {i}", "max_tokens": max_tokens})
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_requests_spread_and_a_killed_worker_loses_no_queued_request(cluster):
    coord = cluster.coordinator("c1")
    cluster.worker("wa", [coord])
    cluster.worker("wb", [coord])
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"wa", "wb"}, 60, "two healthy workers", cluster)

    # Spread: with one slot each, four concurrent requests use both workers.
    assert all(r.status_code == 200 for r in asyncio.run(ask_many(base, 4, 5)))
    assert tokens_of(base, "wa") > 0 and tokens_of(base, "wb") > 0

    # Eight requests of ~1 s for two slots: two run, six wait in the queue.  Kill wa.
    async def scenario() -> list[httpx.Response]:
        pending = asyncio.create_task(ask_many(base, 8, 20))
        await asyncio.sleep(0.5)
        cluster.signal("wa", signal.SIGKILL)
        return await pending

    killed_at = time.monotonic()
    responses = asyncio.run(scenario())
    ok = [r for r in responses if r.status_code == 200]
    failed = [r for r in responses if r.status_code != 200]
    # At most the one request running on wa when it died fails, with a clear error.
    assert len(ok) >= 7, [r.text for r in failed]
    for r in failed:
        assert r.status_code == 503 and "wa" in r.json()["error"]["message"]
    assert all(r.json()["usage"]["completion_tokens"] == 20 for r in ok)
    # wa is reported unhealthy within the heartbeat timeout (1.5 s) plus a heartbeat.
    wait_for(lambda: "wa" not in healthy_workers(base), 10, "wa unhealthy", cluster)
    assert time.monotonic() - killed_at < 1.5 + 10  # bounded by the scenario above
    reasons = {w["id"]: w["unhealthyReason"] for w in health(base)["workers"]}
    assert "no heartbeat" in reasons["wa"]


def test_two_coordinators_one_stopped_and_restarted_no_task_served_twice(cluster):
    c1 = cluster.coordinator("c1")
    c2 = cluster.coordinator("c2")
    cluster.worker("w", [c1, c2], capacity=2)
    base = cluster.gateway([c1, c2])
    wait_for(lambda: healthy_workers(base) == {"w"}, 60, "worker registered", cluster)
    before = tokens_of(base, "w")

    async def scenario() -> list[httpx.Response]:
        pending = asyncio.create_task(ask_many(base, 16, 8, delay=0.15))
        await asyncio.sleep(0.6)
        cluster.signal("c2", signal.SIGTERM)  # graceful: its in-flight requests finish
        await asyncio.sleep(1.0)
        cluster.coordinator("c2")  # same port, same Redis
        return await pending

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    served = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    assert served == 16 * 8
    # Every token the worker generated went to exactly one answer: nothing ran twice.
    assert tokens_of(base, "w") - before == served
    wait_for(lambda: all(c["reachable"] for c in health(base).get("coordinators", [{}])),
             30, "c2 back", cluster)
    assert {c["backend"] for c in health(base)["coordinators"]} == {"redis"}


def test_a_hung_worker_is_detected_and_taken_out_of_rotation(cluster):
    coord = cluster.coordinator("c1")
    cluster.worker("hung", [coord], capacity=4, hang_after=2)
    cluster.worker("good", [coord], capacity=4)
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"hung", "good"}, 60, "two workers", cluster)

    first = asyncio.run(ask_many(base, 4, 10))
    # The requests that landed on the hung engine end with a clear error, not a hang.
    stuck = [r for r in first if r.status_code != 200]
    assert stuck and all("produced nothing" in r.json()["error"]["message"] for r in stuck)
    wait_for(lambda: "hung" not in healthy_workers(base), 10, "hung worker unhealthy", cluster)
    reason = {w["id"]: w["unhealthyReason"] for w in health(base)["workers"]}["hung"]
    assert "no token" in reason or "circuit open" in reason
    after = asyncio.run(ask_many(base, 6, 5))
    assert [r.status_code for r in after] == [200] * 6


def test_sigterm_drains_a_worker_its_requests_finish_and_new_ones_go_elsewhere(cluster):
    coord = cluster.coordinator("c1")
    cluster.worker("leaving", [coord], capacity=2)
    cluster.worker("staying", [coord], capacity=2)
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"leaving", "staying"}, 60, "two workers", cluster)

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        first = asyncio.create_task(ask_many(base, 4, 30))  # ~1.5 s each, on both workers
        await asyncio.sleep(0.5)
        cluster.procs["leaving"].send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        second = await ask_many(base, 4, 5)
        return await first, second

    first, second = asyncio.run(scenario())
    assert [r.status_code for r in first] == [200] * 4  # in-flight work finished
    assert all(r.json()["usage"]["completion_tokens"] == 30 for r in first)
    assert [r.status_code for r in second] == [200] * 4  # served by the other worker
    assert cluster.procs["leaving"].wait(20) == 0  # then it left
    wait_for(lambda: {w["id"] for w in health(base)["workers"]} == {"staying"}, 10,
             "leaving deregistered", cluster)


def test_two_gateway_processes_on_one_redis_allow_the_rate_once(cluster, tmp_path):
    coord = cluster.coordinator("c1")
    cluster.worker("w", [coord], capacity=8, token_delay_s=0.0)
    shared = {"gateway": {"auth_enabled": True, "redis_url": cluster.redis_url, "rate_limit_rpm": 6}}
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(shared))
    made = subprocess.run([sys.executable, "-m", "cyllm", "keys", "create", "--name", "ci", "--config", str(cfg)],
                          capture_output=True, text=True, check=True)
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("cy_") and key not in (tmp_path / "gw.yaml").read_text()
    bases = []
    for name in ("gw1", "gw2"):
        port = cluster._spare.pop()
        cluster._start(name, ["gateway", "--port", str(port), "--coordinator", coord], shared)
        bases.append(f"http://127.0.0.1:{port}")
    for base in bases:
        wait_for(lambda b=base: healthy_workers(b) == {"w"}, 60, "gateway up", cluster)
    headers = {"Authorization": f"Bearer {key}"}
    codes = []
    with httpx.Client(timeout=30) as http:
        for i in range(12):
            r = http.post(f"{bases[i % 2]}/v1/completions", headers=headers,
                          json={"model": "fake", "prompt": "x", "max_tokens": 1})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
    assert codes.count(200) == 6 and codes.count(429) == 6, codes
