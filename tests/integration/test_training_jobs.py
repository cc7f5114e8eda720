"""Training jobs across coordinators sharing Redis, with a worker running custom scripts
(no model needed): dispatch, a cancel arriving at the other coordinator, a coordinator
stopping mid-job (its job re-queued and finished by the other, the device-seconds of both
its runs in the usage ledger), and inference kept away
from a worker that is training when it does not share its device with a job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from cyllm.coordinator.main import CoordinatorServer
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.coordinator.training_meter import Meter
from cyllm.gateway.client import Coordinator
from cyllm.protocol import pb
from cyllm.protocol.plane import load_plane
from tests.polling import returns, until

SCRIPTS = Path(__file__).parents[1] / "data" / "scripts"
FACTS = Path(__file__).parents[1] / "data" / "facts.jsonl"


def _spec(**kw) -> str:
    return json.dumps(
        {"base_model": "fake", "dataset": str(FACTS), "method": "custom", "script": "count_steps.py", **kw}
    )


@pytest.fixture
async def cluster(make_stack, redis_url, tmp_path):
    fast = {"redis_url": redis_url, "lease_s": 1.5, "heartbeat_interval_s": 0.3}
    stack = await make_stack(
        worker={
            "training_scripts_dir": SCRIPTS,
            "training_dir": tmp_path / "jobs",
            "training_shares_device": False,  # the worker takes no inference while training
        },
        **fast,
    )
    other = CoordinatorServer(CoordinatorSettings(port=0, metrics_port=None, **fast))
    port = await other.start()
    plane = load_plane()
    channels = [plane.channel(f"127.0.0.1:{stack.coordinator.port}"), plane.channel(f"127.0.0.1:{port}")]
    stubs = [Coordinator.over(c) for c in channels]
    yield stack, other, stubs
    for c in channels:
        await c.close()
    await other.stop()


async def test_a_job_runs_and_a_cancel_reaches_it_through_the_other_coordinator(cluster):
    stack, _, (one, two) = cluster
    done = await two.training.CreateTrainingJob(
        pb.CreateTrainingJobRequest(spec_json=_spec(script_args=["--steps", "2"]))
    )
    job = await until(
        lambda: one.training.GetTrainingJob(pb.TrainingJobRequest(id=done.id)),
        lambda j: j.state == "succeeded",
    )
    assert job.progress.step == 2 and job.attempts == 1
    events = await one.training.ListTrainingEvents(pb.TrainingEventsRequest(id=done.id))
    assert [e.seq for e in events.events] == list(range(1, len(events.events) + 1))

    long = await one.training.CreateTrainingJob(
        pb.CreateTrainingJobRequest(spec_json=_spec(script_args=["--steps", "1000", "--sleep", "0.2"]))
    )
    await until(
        lambda: two.training.GetTrainingJob(pb.TrainingJobRequest(id=long.id)), lambda j: j.progress.step > 0
    )
    # busy training: the worker gets no inference for its device
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in one.inference.Generate(pb.GenerateRequest(model="fake", prompt="hi")):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "busy training" in caught.value.details()
    assert long.id not in caught.value.details()  # whose job it is: not the caller's business
    cancelled = await two.training.CancelTrainingJob(pb.TrainingJobRequest(id=long.id))
    assert cancelled.state == "cancelled"
    await until(lambda: returns(stack.worker.training.current), lambda c: c == "")

    async def generated() -> list[pb.GenerateResponse] | None:
        """The answer, or None while the coordinators have not yet heard (the worker's next
        heartbeat) that the worker no longer trains."""
        try:
            return [m async for m in one.inference.Generate(pb.GenerateRequest(model="fake", prompt="hi"))]
        except grpc.aio.AioRpcError as exc:
            if "busy training" in (exc.details() or ""):
                return None
            raise

    replies = await until(generated, lambda r: r is not None, what="the worker serving again")
    assert replies[-1].WhichOneof("event") == "finished"


async def test_a_stopping_coordinator_hands_its_job_to_the_other(cluster):
    stack, other, (one, two) = cluster
    job = await two.training.CreateTrainingJob(
        pb.CreateTrainingJobRequest(spec_json=_spec(script_args=["--steps", "15", "--sleep", "0.2"]))
    )
    running = await until(
        lambda: one.training.GetTrainingJob(pb.TrainingJobRequest(id=job.id)),
        lambda j: j.state == "running" and j.progress.step > 0,
    )
    owner, survivor = (
        (stack.coordinator, two) if job.id in stack.coordinator.training._running else (other, one)
    )
    await owner.stop()
    final = await until(
        lambda: survivor.training.GetTrainingJob(pb.TrainingJobRequest(id=job.id)),
        lambda j: j.state in ("succeeded", "failed"),
        timeout=60,
    )
    assert final.state == "succeeded" and final.attempts == 2, final
    events = await survivor.training.ListTrainingEvents(pb.TrainingEventsRequest(id=job.id))
    assert any("shutting down; re-queued" in e.message for e in events.events)
    assert running.worker_id == final.worker_id
    # In the usage ledger: the job once, with the device-seconds of both its runs.
    now = int(time.time())
    report = await survivor.usage.QueryUsage(
        pb.UsageQuery(start=now - 3600, end=now + 3600, group_by=["route"])
    )
    (trained,) = [r for r in report.rows if r.route == "fine_tuning"]
    assert trained.requests == 1 and trained.device_seconds >= 15 * 0.2, trained


async def test_a_running_job_stops_when_its_owners_month_of_device_seconds_is_spent(cluster, monkeypatch):
    """Created under a budget of 1.5 device-seconds a month (as the gateway passes a
    caller's), a job of 100 s stops within a metering period of it being spent, failed
    with insufficient_quota, its process stopped; the owner's next job does not start."""
    monkeypatch.setattr(Meter, "EVERY_S", 0.3)
    stack, _, (one, two) = cluster
    capped = pb.CreateTrainingJobRequest(
        spec_json=_spec(script_args=["--steps", "500", "--sleep", "0.2"]), device_seconds_per_month=1.5
    )
    job = await one.training.CreateTrainingJob(capped)
    final = await until(
        lambda: two.training.GetTrainingJob(pb.TrainingJobRequest(id=job.id)),
        lambda j: j.state in ("succeeded", "failed", "cancelled"),
        timeout=30,
    )
    assert final.state == "failed" and final.error_code == "insufficient_quota", final
    assert "1.5 training device-seconds per month are spent" in final.error
    assert 0 < final.progress.step < 100
    await until(lambda: returns(stack.worker.training.current), lambda c: c == "")  # its process stopped
    nxt = await two.training.CreateTrainingJob(capped)
    refused = await until(
        lambda: one.training.GetTrainingJob(pb.TrainingJobRequest(id=nxt.id)),
        lambda j: j.state in ("succeeded", "failed", "cancelled"),
        timeout=30,
    )
    assert refused.error_code == "insufficient_quota" and refused.progress.step == 0, refused


async def test_unknown_jobs_and_bad_specs_get_clear_statuses(cluster):
    _, _, (one, _) = cluster
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await one.training.GetTrainingJob(pb.TrainingJobRequest(id="ftjob-nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await one.training.CreateTrainingJob(pb.CreateTrainingJobRequest(spec_json=_spec(epochs=-1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "epochs" in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await one.training.CreateTrainingJob(pb.CreateTrainingJobRequest(spec_json=_spec(base_model="gpt-9")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    too_many = json.dumps({"base_model": "fake", "dataset": str(FACTS), "processes": 64})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await one.training.CreateTrainingJob(pb.CreateTrainingJobRequest(spec_json=too_many))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "processes: 64, but the training workers have at most" in caught.value.details()
    for bad in ("{not json", "[1]"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await one.training.CreateTrainingJob(pb.CreateTrainingJobRequest(spec_json=bad))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
