"""The worker's Prometheus metrics (names as in docs/design.md)."""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cyllm.telemetry import LATENCY_BUCKETS
from cyllm.worker.models import ModelManager


class WorkerMetrics:
    def __init__(self, models: ModelManager, worker_id: str) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "worker_inference_latency",
            "Seconds from a generation's start to its end",
            ["model", "finish_reason"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "worker_time_to_first_token_seconds",
            "Seconds from a generation's start to its first text",
            ["model"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.tokens = Counter(
            "worker_generated_tokens", "Tokens generated", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "worker_requests", "Generations by outcome", ["model", "outcome"], registry=self.registry
        )
        self.registry.register(_EngineCollector(models, worker_id))

    def timer(self, model: str) -> GenerationTimer:
        return GenerationTimer(self, model)


class GenerationTimer:
    """Times one generation: ``text()`` on each delta, ``done()`` once at the end."""

    def __init__(self, metrics: WorkerMetrics, model: str) -> None:
        self.m, self.model = metrics, model
        self.start = time.perf_counter()
        self.first = True

    def text(self) -> None:
        if self.first:
            self.m.ttft.labels(self.model).observe(time.perf_counter() - self.start)
            self.first = False

    def done(self, finish_reason: str, completion_tokens: int) -> None:
        self.m.latency.labels(self.model, finish_reason).observe(time.perf_counter() - self.start)
        self.m.tokens.labels(self.model).inc(completion_tokens)
        self.m.requests.labels(self.model, finish_reason).inc()

    def failed(self, code: str) -> None:
        self.m.requests.labels(self.model, code).inc()


class _EngineCollector(Collector):
    """Read at scrape time: running/waiting per engine, health, device memory, the
    memory manager's budget and estimates."""

    def __init__(self, models: ModelManager, worker_id: str) -> None:
        self.models, self.worker_id = models, worker_id

    def collect(self):
        running = GaugeMetricFamily(
            "worker_running_requests", "Sequences in the engine's batch", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "worker_waiting_requests", "Accepted, not yet prefilled", labels=["model"]
        )
        healthy = GaugeMetricFamily("worker_engine_healthy", "1 when the engine is healthy", labels=["model"])
        for model, engine in self.models.engines().items():
            h = engine.health()
            running.add_metric([model], h.running)
            waiting.add_metric([model], h.waiting)
            healthy.add_metric([model], 1.0 if h.healthy else 0.0)
        memory = GaugeMetricFamily(
            "worker_gpu_memory_bytes",
            "Device memory in use: CUDA memory allocated per GPU, or the process's resident "
            "memory on a CPU-only worker",
            labels=["device"],
        )
        for device, used in _device_memory():
            memory.add_metric([device], used)
        budget = GaugeMetricFamily(
            "worker_memory_budget_bytes", "Memory the worker's models may use (the memory manager's limit)"
        )
        budget.add_metric([], self.models.budget.limit)
        estimate = GaugeMetricFamily(
            "worker_model_memory_estimate_bytes",
            "Estimated weights + KV cache of each loaded model",
            labels=["model"],
        )
        for model, used in self.models.budget.used.items():
            estimate.add_metric([model], used.total)
        yield from (running, waiting, healthy, memory, budget, estimate)


def _device_memory() -> list[tuple[str, float]]:
    import sys

    torch = sys.modules.get("torch")  # only if an engine already imported it
    if torch is not None and torch.cuda.is_available():
        return [
            (f"cuda:{i}", float(torch.cuda.memory_allocated(i))) for i in range(torch.cuda.device_count())
        ]
    return [("cpu", float(_rss_bytes()))]


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
