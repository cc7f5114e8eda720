"""Where a job's processes go: the worker counts its devices (GPUs, NPUs, or CPU cores),
the coordinator gives a job only to a worker with enough of them, and the presets that
shard a model over GPUs are refused elsewhere by name."""

from __future__ import annotations

import os

import pytest
from transformers import TrainingArguments

from cyllm import errors
from cyllm.coordinator.training import _enough, _fits
from cyllm.protocol import pb
from cyllm.training.spec import TrainingSpec
from cyllm.worker.devices import device_count
from cyllm.worker.settings import WorkerSettings
from cyllm.worker.training import presets
from cyllm.worker.training.jobs import WorkerTraining


def _spec(**kw) -> TrainingSpec:
    return TrainingSpec.parse({"base_model": "m", "dataset": "d.jsonl", **kw})


def test_a_cpu_worker_counts_its_cores_and_places_a_job_on_them():
    cores = len(os.sched_getaffinity(0))
    assert device_count("cpu") == cores and device_count("cuda:3") == 1
    training = WorkerTraining(WorkerSettings(), dict, "cpu", lambda: None)
    assert training.devices == cores
    assert training._placed(_spec(devices="all")).processes == 1  # one process uses every core
    assert training._placed(_spec(processes=cores)).processes == cores
    with pytest.raises(
        errors.InvalidRequest, match=f"processes: {cores + 1}, but this worker has {cores} CPU cores"
    ):
        training._placed(_spec(processes=cores + 1))
    pinned = WorkerTraining(WorkerSettings(training_device="cuda:3"), dict, "cuda", lambda: None)
    assert pinned.devices == 1  # a named device is one device


def test_the_coordinator_gives_a_job_to_a_worker_with_enough_devices():
    small = pb.WorkerInfo(trains=True, training_devices=2, available=[pb.ModelInfo(id="m")])
    big = pb.WorkerInfo(trains=True, training_devices=8, available=[pb.ModelInfo(id="m")])
    older = pb.WorkerInfo(trains=True, available=[pb.ModelInfo(id="m")])  # says nothing: one
    four = _spec(processes=4)
    assert not _fits(small, four) and _fits(big, four) and not _fits(older, four)
    assert _fits(older, _spec()) and _enough(small, _spec(devices="all"))
    assert not _fits(big, _spec(base_model="other"))


def test_sharding_presets_are_for_gpus_and_build_valid_arguments(tmp_path):
    assert presets.arguments("ddp", "cpu", False) == {}
    for preset in presets.SHARDED:
        with pytest.raises(
            errors.InvalidRequest, match=f"distributed: '{preset}' shards the model over GPUs"
        ):
            presets.arguments(preset, "cpu", False)
    fsdp = presets.arguments("fsdp", "cuda:0", True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **fsdp)  # transformers accepts them
    assert args.fsdp_config["version"] == 2 and args.fsdp_config["state_dict_type"] == "FULL_STATE_DICT"
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        with pytest.raises(errors.InvalidRequest, match="needs DeepSpeed on the worker"):
            presets.arguments("zero3", "cuda:0", True)
    else:
        zero3 = presets.arguments("zero3", "cuda:0", True)["deepspeed"]["zero_optimization"]
        assert zero3["stage"] == 3 and zero3["stage3_gather_16bit_weights_on_model_save"]
    with pytest.raises(errors.InvalidRequest, match="does not shard a quantized model"):
        _spec(distributed="fsdp", quantization="4bit")
