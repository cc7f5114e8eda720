"""Where a training result is served: a LoRA adapter beside its base, or — when the
engine serving the base takes no adapters at run time (vLLM, the default on a CPU,
started without LoRA slots) — the base with the adapter applied, as a model of its own,
rather than a job that trained and then failed."""

from __future__ import annotations

import json

from cyllm import errors
from cyllm.coordinator.pool import HealthRules
from cyllm.coordinator.registry import SqliteRegistry
from cyllm.coordinator.routing import Router
from cyllm.coordinator.scheduler import MemoryScheduler
from cyllm.coordinator.sqlite import Database
from cyllm.coordinator.sqlite_jobs import SqliteJobStore
from cyllm.coordinator.training import TrainingManager
from cyllm.protocol import pb


class Workers:
    """The worker side of a load, as the engines answer it."""

    def __init__(self, adapters_at_run_time: bool) -> None:
        self.adapters_at_run_time = adapters_at_run_time
        self.loads: list[pb.LoadModelRequest] = []

    async def load_model(self, address: str, request: pb.LoadModelRequest) -> pb.LoadModelResponse:
        self.loads.append(request)
        if request.adapter_path and not self.adapters_at_run_time:
            raise errors.NotLoadable("model 'base' was started without LoRA")
        info = pb.WorkerInfo(
            worker_id="w1", address=address, capacity=1, models=[pb.ModelInfo(id=request.model)]
        )
        return pb.LoadModelResponse(worker=info, worker_id="w1")


async def finish(adapters_at_run_time: bool) -> tuple[pb.TrainingJob, Workers]:
    db = Database(":memory:")
    await db.start()
    store, workers, registry = SqliteJobStore(db), Workers(adapters_at_run_time), SqliteRegistry(db)
    scheduler = MemoryScheduler(
        HealthRules(5, 5),
        Router("least_outstanding"),
        registry,
        queue_timeout_s=1,
        max_size=1,
        retry_after_s=1,
    )
    manager = TrainingManager(store, None, scheduler, workers, registry, "c1", lease_s=5, max_attempts=1)
    job = pb.TrainingJob(
        id="ftjob-0123456789abcdef",
        owner="alice",
        spec_json=json.dumps({"base_model": "base", "dataset": "d.jsonl"}),
    )
    await store.put(job)
    result = pb.TrainingEvent(type="result", result_kind="adapter", result_path="/jobs/x/adapter")
    await manager._succeed(job, pb.WorkerInfo(worker_id="w1", address="w1:1"), result)
    return await store.get(job.id), workers


async def test_an_adapter_is_served_beside_its_base_where_the_engine_takes_it():
    job, workers = await finish(adapters_at_run_time=True)
    assert job.state == "succeeded" and job.fine_tuned_model == "base:ft-89abcdef"
    assert [r.adapter_path for r in workers.loads] == ["/jobs/x/adapter"]


async def test_an_engine_without_adapters_serves_the_base_with_it_applied():
    job, workers = await finish(adapters_at_run_time=False)
    assert job.state == "succeeded" and job.fine_tuned_model == "base-ft-89abcdef"
    second = workers.loads[-1]
    assert (second.model, second.from_model, second.peft_adapter_path) == (
        "base-ft-89abcdef",
        "base",
        "/jobs/x/adapter",
    )
