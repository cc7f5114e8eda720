"""Distributed mode with real processes: Redis, coordinators, workers and a gateway
started separately (``cyllm coordinator|worker|gateway``), the fake engine as workers'
model so that the tests are about the plumbing, not about the model."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from cyllm.gateway.counters import LIVE
from tests import polling
from tests.conftest import environment_for, free_ports, stop_processes

FAST = {"heartbeat_interval_s": 0.3, "heartbeat_timeout_s": 1.5, "progress_timeout_s": 1.5, "lease_s": 2.0}


class Cluster:
    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp, self.redis_url = tmp, redis_url
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.env: dict[str, str] = {}  # for every process started after it is set
        self._spare = free_ports(8)  # chosen together, so no two processes get the same

    def _start(self, name: str, args: list[str], config: dict) -> None:
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cyllm", *args, "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**environment_for(cfg), "PYTHONUNBUFFERED": "1", **self.env},
        )

    def coordinator(self, name: str, **kw) -> str:
        port = self.ports.get(name) or self.ports.setdefault(name, self._spare.pop())
        self._start(
            name,
            ["coordinator", "--port", str(port), "--redis-url", self.redis_url],
            {"coordinator": {**FAST, "coordinator_id": name, "metrics_port": 0, **kw}},
        )
        return f"127.0.0.1:{port}"

    def worker(self, name: str, coordinators: list[str], capacity: int = 1, **engine_args) -> str:
        port = self.ports.get(name) or self.ports.setdefault(name, self._spare.pop())
        args = ["worker", "--port", str(port)]
        for c in coordinators:
            args += ["--coordinator", c]
        self._start(
            name,
            args,
            {
                "worker": {"worker_id": name, "metrics_port": 0},
                "models": [
                    {
                        "id": "fake",
                        "engine": "fake",
                        "max_batch_size": capacity,
                        "engine_args": {"token_delay_s": 0.05, **engine_args},
                    }
                ],
            },
        )
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
        stop_processes(self.procs.values(), 15)

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


def wait_for(predicate, timeout: float, what: str, cluster: Cluster) -> None:
    """The suite's poller, with the processes' logs on a failure."""
    polling.wait_for(predicate, timeout=timeout, what=what, describe=cluster.logs)


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
            return await http.post(
                f"{base}/v1/completions",
                json={"model": "fake", "prompt": f"request {i}", "max_tokens": max_tokens},
            )

        return await asyncio.gather(*(one(i) for i in range(n)))


async def ask_mixed(base: str, n: int, max_tokens: int, delay: float = 0.0) -> list[tuple[int, str, int]]:
    """``n`` concurrent completions, every other one streamed: (status, text, completion
    tokens); a streamed one that ends with an error event counts as status 599."""
    async with httpx.AsyncClient(timeout=120) as http:

        async def one(i: int) -> tuple[int, str, int]:
            await asyncio.sleep(delay * i)
            body = {"model": "fake", "prompt": f"request {i}", "max_tokens": max_tokens}
            if i % 2:
                r = await http.post(f"{base}/v1/completions", json=body)
                if r.status_code != 200:
                    return r.status_code, r.text, 0
                return 200, r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]
            body.update(stream=True, stream_options={"include_usage": True})
            async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return r.status_code, (await r.aread()).decode(), 0
                text, usage = [], 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return 599, json.dumps(chunk), 0
                    text += [c["text"] for c in chunk["choices"]]
                    usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
                return 200, "".join(text), usage

        return await asyncio.gather(*(one(i) for i in range(n)))


async def until_generating(base: str, workers: list[str], since: dict[str, int]) -> None:
    """Until each worker has generated tokens past ``since`` and is still running: a
    kill then lands mid-generation on a loaded machine too, where a fixed sleep could
    land before the first token."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = {w["id"]: w for w in (await asyncio.to_thread(health, base)).get("workers", [])}
        if all(w in now and now[w]["running"] and now[w]["tokensGenerated"] > since[w] for w in workers):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{workers} did not start generating")


def words(n: int) -> str:
    """The fake engine's undisturbed greedy answer of ``n`` tokens."""
    return " ".join(f"w{i}" for i in range(n))


def assert_all_exact(results: list[tuple[int, str, int]], n: int, cluster: Cluster) -> None:
    bad = [r for r in results if r != (200, words(n), n)]
    assert not bad, f"{len(bad)} of {len(results)} lost or corrupted: {bad[:3]}\n{cluster.logs()}"


def test_a_worker_killed_mid_generation_loses_no_request_and_corrupts_no_stream(cluster):
    coord = cluster.coordinator("c1")
    cluster.worker("wa", [coord], capacity=8)
    cluster.worker("wb", [coord], capacity=8)
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"wa", "wb"}, 60, "two healthy workers", cluster)

    # Spread: four concurrent requests use both workers.
    assert_all_exact(asyncio.run(ask_mixed(base, 4, 5)), 5, cluster)
    assert tokens_of(base, "wa") > 0 and tokens_of(base, "wb") > 0

    # Sixteen requests of ~1.5 s (8 streamed), running on both workers.  Kill wa mid-way.
    since = {w: tokens_of(base, w) for w in ("wa", "wb")}

    async def scenario() -> list[tuple[int, str, int]]:
        pending = asyncio.create_task(ask_mixed(base, 16, 30))
        await until_generating(base, ["wa"], since)
        cluster.signal("wa", signal.SIGKILL)
        return await pending

    assert_all_exact(asyncio.run(scenario()), 30, cluster)
    assert re.search(r"worker wa failed \(.*\); continuing on the next", (cluster.tmp / "c1.log").read_text())
    wait_for(lambda: "wa" not in healthy_workers(base), 10, "wa unhealthy", cluster)
    reasons = {w["id"]: w["unhealthyReason"] for w in health(base)["workers"]}
    assert "no heartbeat" in reasons["wa"] or "circuit open" in reasons["wa"]


def test_a_coordinator_killed_mid_generation_loses_no_request_and_corrupts_no_stream(cluster):
    c1 = cluster.coordinator("c1")
    c2 = cluster.coordinator("c2")
    cluster.worker("wa", [c1, c2], capacity=8)
    cluster.worker("wb", [c1, c2], capacity=8)
    base = cluster.gateway([c1, c2])
    wait_for(lambda: healthy_workers(base) == {"wa", "wb"}, 60, "two healthy workers", cluster)

    since = {w: tokens_of(base, w) for w in ("wa", "wb")}

    async def scenario() -> list[tuple[int, str, int]]:
        pending = asyncio.create_task(ask_mixed(base, 16, 30))
        await until_generating(base, ["wa", "wb"], since)
        cluster.signal("c2", signal.SIGKILL)
        return await pending

    assert_all_exact(asyncio.run(scenario()), 30, cluster)
    assert re.search(
        r"coordinator \S+ failed \(.*\); continuing on the next", (cluster.tmp / "gateway.log").read_text()
    )
    # With c2 gone, c1 serves alone; back on its port, c2 serves again.
    assert_all_exact(asyncio.run(ask_mixed(base, 4, 5)), 5, cluster)
    cluster.coordinator("c2")
    wait_for(
        lambda: all(c["reachable"] for c in health(base).get("coordinators", [{}])), 30, "c2 back", cluster
    )


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
    wait_for(
        lambda: all(c["reachable"] for c in health(base).get("coordinators", [{}])), 30, "c2 back", cluster
    )
    assert {c["backend"] for c in health(base)["coordinators"]} == {"redis"}


def test_a_hung_workers_requests_move_elsewhere_and_it_leaves_rotation(cluster):
    coord = cluster.coordinator("c1")
    cluster.worker("hung", [coord], capacity=4, hang_after=2)
    cluster.worker("good", [coord], capacity=4)
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"hung", "good"}, 60, "two workers", cluster)

    # Those that landed on the hung engine stall after two tokens, then go on elsewhere.
    assert_all_exact(asyncio.run(ask_mixed(base, 4, 10)), 10, cluster)
    assert "produced nothing" in (cluster.tmp / "c1.log").read_text()
    wait_for(lambda: "hung" not in healthy_workers(base), 10, "hung worker unhealthy", cluster)
    reason = {w["id"]: w["unhealthyReason"] for w in health(base)["workers"]}["hung"]
    assert "no token" in reason or "circuit open" in reason
    assert_all_exact(asyncio.run(ask_mixed(base, 6, 5)), 5, cluster)


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
    wait_for(
        lambda: {w["id"] for w in health(base)["workers"]} == {"staying"}, 10, "leaving deregistered", cluster
    )


def test_two_gateway_processes_on_one_redis_allow_the_rate_once(cluster, tmp_path):
    coord = cluster.coordinator("c1")
    cluster.worker("w", [coord], capacity=8, token_delay_s=0.0)
    shared = {"gateway": {"auth_enabled": True, "redis_url": cluster.redis_url, "rate_limit_rpm": 6}}
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(shared))
    made = subprocess.run(
        [sys.executable, "-m", "cyllm", "keys", "create", "--name", "ci", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=True,
        env=environment_for(cfg),
    )
    key = made.stdout.strip().splitlines()[-1]
    assert key.startswith("cy_") and key not in (tmp_path / "gw.yaml").read_text()
    bases = two_gateways(cluster, coord, shared)
    headers = {"Authorization": f"Bearer {key}"}
    codes = []
    with httpx.Client(timeout=30) as http:
        for i in range(12):
            r = http.post(
                f"{bases[i % 2]}/v1/completions",
                headers=headers,
                json={"model": "fake", "prompt": "x", "max_tokens": 1},
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
    assert codes.count(200) == 6 and codes.count(429) == 6, codes


def two_gateways(cluster: Cluster, coord: str, config: dict) -> list[str]:
    """Two gateway processes of one configuration, both up with the worker ``w``."""
    bases = []
    for name in ("gw1", "gw2"):
        port = cluster._spare.pop()
        cluster._start(name, ["gateway", "--port", str(port), "--coordinator", coord], config)
        bases.append(f"http://127.0.0.1:{port}")
    for base in bases:
        wait_for(lambda b=base: healthy_workers(b) == {"w"}, 60, "gateway up", cluster)
    return bases


@pytest.fixture
def aof_cluster(tmp_path, own_redis):
    c = Cluster(tmp_path, own_redis.url)
    c.redis = own_redis
    yield c
    c.stop_all()


def test_a_redis_restart_loses_no_queued_request_and_its_outage_is_a_clear_503(aof_cluster):
    cluster = aof_cluster
    coord = cluster.coordinator("c1")
    cluster.worker("w", [coord], capacity=1)
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"w"}, 60, "worker registered", cluster)

    async def scenario() -> tuple[list[tuple[int, str, int]], list[int]]:
        # One slot: one request runs (~1 s), five wait in Redis's queue.
        pending = asyncio.create_task(ask_mixed(base, 6, 20))
        await asyncio.sleep(0.5)
        cluster.redis.stop()  # SIGTERM: Redis writes its AOF and exits
        during = []
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(3):
                r = await http.post(
                    f"{base}/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2}
                )
                during.append(r.status_code)
                if r.status_code == 503:
                    assert "Redis" in r.json()["error"]["message"], r.text
                await asyncio.sleep(0.3)
        cluster.redis.start()  # same port, same data
        return await pending, during

    results, during = asyncio.run(scenario())
    assert during == [503, 503, 503], during
    assert_all_exact(results, 20, cluster)
    # Recovered without a restart: new requests are served.
    assert_all_exact(asyncio.run(ask_mixed(base, 4, 5)), 5, cluster)
    assert cluster.procs["c1"].poll() is None


def test_redis_losing_its_data_loses_no_queued_request(cluster):
    """What a failover to a replica that missed the last writes does, at its worst: the
    queue, the worker records and the leases are gone.  The coordinators queue their
    waiting requests again and the workers register again."""
    coord = cluster.coordinator("c1")
    cluster.worker("w", [coord], capacity=1)
    base = cluster.gateway([coord])
    wait_for(lambda: healthy_workers(base) == {"w"}, 60, "worker registered", cluster)

    async def scenario() -> list[tuple[int, str, int]]:
        pending = asyncio.create_task(ask_mixed(base, 5, 20))
        await asyncio.sleep(0.5)
        r = redis.Redis.from_url(cluster.redis_url)
        r.flushall()
        r.close()
        return await pending

    assert_all_exact(asyncio.run(scenario()), 20, cluster)
    assert "lost from redis; queued again" in (cluster.tmp / "c1.log").read_text()


def test_a_retry_after_its_gateway_died_gets_the_first_attempts_result(cluster):
    c1 = cluster.coordinator("c1")
    c2 = cluster.coordinator("c2")
    cluster.worker("w", [c1, c2], capacity=2)
    bases = []
    for name, coord in (("gw1", c1), ("gw2", c2)):  # each its own coordinator: the two
        port = cluster._spare.pop()  # attempts meet only in Redis
        cluster._start(name, ["gateway", "--port", str(port), "--coordinator", coord], {})
        bases.append(f"http://127.0.0.1:{port}")
    for base in bases:
        wait_for(lambda b=base: healthy_workers(b) == {"w"}, 60, "gateways up", cluster)
    before = tokens_of(bases[1], "w")
    body = {"model": "fake", "prompt": "pay once", "max_tokens": 30}
    headers = {"Idempotency-Key": "invoice-7"}

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            first = asyncio.create_task(http.post(f"{bases[0]}/v1/completions", json=body, headers=headers))
            await asyncio.sleep(0.5)
            cluster.signal("gw1", signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                await first
            return await http.post(f"{bases[1]}/v1/completions", json=body, headers=headers)

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == words(30)
    assert tokens_of(bases[1], "w") - before == 30  # one generation, not two


def test_two_gateways_on_one_redis_share_a_budget_and_report_to_one_ledger(cluster, tmp_path, redis_url):
    """A key's budget holds across two gateway processes under concurrent requests, the
    ledger adds up what both served (read with ``cyllm usage``), and a budget's counters
    lost from Redis start again from the ledger."""
    coord = cluster.coordinator("c1")
    cluster.worker("w", [coord], capacity=8, token_delay_s=0.0)
    shared = {"gateway": {"auth_enabled": True, "redis_url": cluster.redis_url, "usage_report_s": 0.2}}
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(yaml.safe_dump(shared))

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cyllm", *args], capture_output=True, text=True, env=environment_for(cfg)
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    capped = cli("keys", "create", "--name", "capped", "--budget", "tokens_per_day=60", "--config", str(cfg))
    admin = cli("keys", "create", "--name", "ops", "--admin", "--config", str(cfg))
    capped_key, admin_key = capped.strip().splitlines()[-1], admin.strip().splitlines()[-1]
    capped_id = capped.split()[1]
    bad = subprocess.run(
        [sys.executable, "-m", "cyllm", "keys", "create", "--name", "x", "--budget", "tokens_per_day=-1"],
        capture_output=True,
        text=True,
        env=environment_for(cfg),
    )
    assert bad.returncode == 2 and "tokens_per_day" in bad.stderr
    bases = two_gateways(cluster, coord, shared)
    headers = {"Authorization": f"Bearer {capped_key}"}
    body = {"model": "fake", "prompt": "one two", "max_tokens": 5}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as http:
            return await asyncio.gather(
                *(http.post(f"{bases[i % 2]}/v1/completions", headers=headers, json=body) for i in range(16))
            )

    # One request on each gateway first: both spend from the budget, whoever wins the burst.
    first = [httpx.post(f"{base}/v1/completions", headers=headers, json=body, timeout=30) for base in bases]
    assert [r.status_code for r in first] == [200, 200], [r.text for r in first]
    replies = asyncio.run(burst())
    ok = first + [r for r in replies if r.status_code == 200]
    assert len(ok) > 2 and len(ok) < 18 and all(r.status_code in (200, 429) for r in replies), [
        r.text for r in replies
    ]
    used = sum(r.json()["usage"]["total_tokens"] for r in ok)
    assert used <= 60

    def ledger() -> dict:
        out = cli("usage", "--url", bases[0], "--api-key", admin_key, "--group-by", "subject", "--json")
        return {d["subject"]: d for d in json.loads(out)["data"]}

    # Refused at admission, a request used nothing and is not in the ledger.
    wait_for(
        lambda: ledger().get(f"key:{capped_id}", {}).get("requests") == len(ok), 20, "the ledger", cluster
    )
    assert ledger()[f"key:{capped_id}"]["totalTokens"] == used
    csv_out = cli("usage", "--url", bases[1], "--api-key", capped_key, "--group-by", "model", "--csv")
    assert csv_out.splitlines()[0].startswith("model,requests") and "fake," in csv_out

    # The counters gone from Redis: they start again from the ledger, the budget holds.
    client = redis.Redis.from_url(redis_url)
    client.delete(*client.keys("cyllm:budget:*"))
    client.close()
    again = httpx.post(
        f"{bases[1]}/v1/completions", headers=headers, json={**body, "max_tokens": max(1, 60 - used)}
    )
    assert again.status_code == 429 and again.json()["error"]["code"] == "insufficient_quota", again.text

    # Cleared from the command line, the budget no longer applies, on either gateway.
    assert "no budget" in cli("keys", "budget", capped_id, "--clear", "--config", str(cfg))
    assert httpx.post(f"{bases[0]}/v1/completions", headers=headers, json=body).status_code == 200
    table = cli("usage", "--url", bases[0], "--api-key", admin_key, "--group-by", "subject")
    assert f"key:{capped_id}" in table and "total" in table


class OtlpReceiver:
    """An OTLP trace receiver in the test, over HTTP (``url``) and gRPC (``grpc_url``):
    what the processes export, decoded (``ExportTraceServiceRequest``) into (service,
    span) pairs."""

    def __init__(self) -> None:
        import gzip
        import threading
        from concurrent.futures import ThreadPoolExecutor
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        received = self.spans = []
        lock = self.lock = threading.Lock()

        def keep(export: ExportTraceServiceRequest) -> None:
            with lock:
                for resource in export.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        received.extend((attrs.get("service.name"), span) for span in scope.spans)

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                keep(request)
                return ExportTraceServiceResponse()

        self.grpc_server = grpc.server(ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.grpc_server)
        self.grpc_url = f"http://127.0.0.1:{self.grpc_server.add_insecure_port('127.0.0.1:0')}"
        self.grpc_server.start()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                keep(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id.hex() == trace_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.grpc_server.stop(0)


def attributes(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        kind = v.WhichOneof("value")
        out[a.key] = (
            [x.string_value for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
        )
    return out


def test_one_trace_across_gateway_coordinator_and_worker_processes(cluster):
    """With the standard OTEL_* variables set, a request that brings a traceparent is one
    trace across the three processes, exported over OTLP: the gateway's request and
    admission, the coordinator's generation, placement, cache and queue wait, the
    worker's generation with its time to first token and tokens; the request id on it.
    The worker exports over OTLP/gRPC, the others over OTLP/HTTP (the default)."""
    receiver = OtlpReceiver()
    try:
        over_http = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        cluster.env = over_http
        coord = cluster.coordinator("c1")
        cluster.env = {
            **over_http,
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.grpc_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        }
        cluster.worker("w", [coord], capacity=2, token_delay_s=0.0)
        cluster.env = over_http
        base = cluster.gateway([coord])
        wait_for(lambda: healthy_workers(base) == {"w"}, 60, "gateway up", cluster)
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        r = httpx.post(
            f"{base}/v1/chat/completions",
            headers={"traceparent": f"00-{trace_id}-{parent}-01"},
            json={"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        wanted = {
            "POST /v1/chat/completions",
            "admission",
            "coordinator.generate",
            "placement",
            "cache",
            "queue",
            "worker.generate",
        }
        wait_for(lambda: wanted <= {s.name for _, s in receiver.trace(trace_id)}, 30, "the spans", cluster)
        spans = {s.name: (service, s) for service, s in receiver.trace(trace_id)}
        assert {spans[n][0] for n in wanted} == {"cyllm-gateway", "cyllm-coordinator", "cyllm-worker"}
        edge = spans["POST /v1/chat/completions"][1]
        assert edge.parent_span_id.hex() == parent  # the caller's span is its parent
        assert attributes(edge)["cyllm.request_id"] == r.headers["x-request-id"]
        assert attributes(edge)["http.response.status_code"] == 200
        coordinator = spans["coordinator.generate"][1]
        assert coordinator.parent_span_id == edge.span_id
        assert attributes(coordinator)["cyllm.request_id"] == r.headers["x-request-id"]
        worker = spans["worker.generate"][1]
        assert worker.parent_span_id == coordinator.span_id
        assert attributes(worker)["gen_ai.usage.output_tokens"] == 3
        assert attributes(worker)["gen_ai.latency.time_to_first_token"] > 0
        assert attributes(worker)["gen_ai.response.finish_reasons"] == ["length"]
        assert spans["queue"][1].parent_span_id == coordinator.span_id
        assert attributes(spans["queue"][1])["cyllm.worker"] == "w"
        # A request without one starts a trace of its own, still across the processes.
        r = httpx.post(
            f"{base}/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 1}, timeout=30
        )
        assert r.status_code == 200

        def its_trace() -> set[str]:
            with receiver.lock:
                mine = [
                    s
                    for _, s in receiver.spans
                    if attributes(s).get("cyllm.request_id") == r.headers["x-request-id"]
                ]
            return {s.trace_id.hex() for s in mine} if len(mine) >= 2 else set()

        wait_for(lambda: len(its_trace()) == 1 and its_trace() != {trace_id}, 30, "a new trace", cluster)
        # A malformed traceparent is ignored (a trace of its own), and a caller's "not
        # sampled" flag does not hide its request from the operator's traces.
        for header in ("garbage", "00-" + "z" * 32 + "-" + "1" * 16 + "-01", "x" * 10_000):
            r = httpx.post(
                f"{base}/v1/completions",
                headers={"traceparent": header},
                json={"model": "fake", "prompt": "x", "max_tokens": 1},
                timeout=30,
            )
            assert r.status_code == 200, (header[:40], r.text)
        hidden = "5bf92f3577b34da6a3ce929d0e0e4736"
        r = httpx.post(
            f"{base}/v1/completions",
            headers={"traceparent": f"00-{hidden}-{parent}-00"},
            json={"model": "fake", "prompt": "x", "max_tokens": 1},
            timeout=30,
        )
        assert r.status_code == 200
        wait_for(
            lambda: "worker.generate" in {s.name for _, s in receiver.trace(hidden)}, 30, "recorded", cluster
        )
    finally:
        receiver.close()


def test_a_gateway_killed_mid_request_gives_its_callers_slot_back(cluster):
    """Two gateways on one Redis, one generation at a time per caller.  The gateway
    serving it is killed: the slot stays held (the other gateway refuses a second
    generation) while the dead gateway may still be alive, and is let go once its last
    sign of life is older than ``DEAD_AFTER_S`` (set back here rather than waited for)."""
    coord = cluster.coordinator("c1")
    cluster.worker("w", [coord], capacity=2)
    gw = {"gateway": {"redis_url": cluster.redis_url, "rate_limit_concurrency": 1}}
    bases = two_gateways(cluster, coord, gw)
    body = {"model": "fake", "prompt": "hold the slot", "max_tokens": 200}
    since = {"w": tokens_of(bases[1], "w")}

    async def kill_mid_request() -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            first = asyncio.create_task(http.post(f"{bases[0]}/v1/completions", json=body))
            await until_generating(bases[1], ["w"], since)
            cluster.signal("gw1", signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                await first

    asyncio.run(kill_mid_request())
    short = {**body, "max_tokens": 2}
    held = httpx.post(f"{bases[1]}/v1/completions", json=short, timeout=30)
    assert held.status_code == 429 and "generations at once" in held.text, held.text
    r = redis.Redis.from_url(cluster.redis_url)
    dead = [
        m.decode()
        for m in r.zrange(LIVE, 0, -1)
        if m.decode().split("-")[-2] == str(cluster.procs["gw1"].pid)
    ]
    assert len(dead) == 1
    r.zadd(LIVE, {dead[0]: 0})  # its last mark, long ago
    r.close()
    again = httpx.post(f"{bases[1]}/v1/completions", json=short, timeout=30)
    assert again.status_code == 200, again.text
