"""The engine factory: names, auto-detection, clear refusals when a library or the
hardware is missing; the Ascend device checks against a fake torch_npu; hybrid fallback."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from cyllm import errors
from cyllm.worker.engines import factory
from cyllm.worker.engines.types import GenerationRequest, SamplingParams, TextDelta
from cyllm.worker.settings import EngineCandidate, ModelSpec, WorkerSettings
from tests.engines.conftest import default_folder


def spec(**kw) -> ModelSpec:
    return ModelSpec(**{"id": "m", "path": default_folder(), **kw})


@pytest.mark.parametrize(
    "accel, installed, cpu_engine, expected",
    [
        ("cuda", {"vllm"}, "transformers", "vllm_cuda"),
        ("cuda", set(), "transformers", "transformers"),
        ("npu", {"vllm_ascend"}, "transformers", "vllm_ascend"),
        ("npu", set(), "transformers", "ascend"),
        ("cpu", {"vllm"}, "llama_cpp", "llama_cpp"),
        ("cpu", set(), "transformers", "transformers"),
        ("cpu", {"vllm"}, "auto", "vllm"),
        ("cpu", set(), "auto", "transformers"),
    ],
)
def test_auto_picks_by_hardware_and_installed_libraries(monkeypatch, accel, installed, cpu_engine, expected):
    monkeypatch.setattr(factory, "detect_accelerator", lambda: accel)
    monkeypatch.setattr(factory, "installed", lambda name: name in installed)
    assert factory.resolve_engine_name(spec(engine="auto"), cpu_engine) == expected


@pytest.mark.parametrize("accel", ["cpu", "cuda"])
def test_auto_gives_a_peft_adapter_to_the_engine_that_applies_it(monkeypatch, accel):
    monkeypatch.setattr(factory, "detect_accelerator", lambda: accel)
    monkeypatch.setattr(factory, "installed", lambda name: True)
    assert factory.resolve_engine_name(spec(engine="auto", peft_adapter=Path("/a")), "auto") == "transformers"


def test_the_default_spec_and_worker_pick_by_hardware():
    assert ModelSpec(id="m", path=Path("/m")).engine == "auto"
    assert WorkerSettings.model_fields["cpu_engine"].default == "auto"


def test_auto_on_npu_with_a_mindie_endpoint_picks_mindie(monkeypatch):
    monkeypatch.setattr(factory, "detect_accelerator", lambda: "npu")
    monkeypatch.setattr(factory, "installed", lambda name: False)
    s = spec(engine="auto", engine_args={"endpoint": "http://127.0.0.1:1025"})
    assert factory.resolve_engine_name(s) == "mindie"


@pytest.mark.parametrize(
    "engine, package", [("trtllm", "tensorrt_llm"), ("vllm_ascend", "vllm_ascend"), ("ascend", "torch_npu")]
)
def test_missing_library_is_refused_naming_package_and_hardware(engine, package):
    with pytest.raises(errors.NotLoadable) as info:
        factory.create_engine(spec(engine=engine), WorkerSettings().cache_dir)
    msg = info.value.message
    assert package in msg and ("GPU" in msg or "NPU" in msg) and "pip install" in msg


def test_unknown_engine_arguments_are_refused_by_name():
    pytest.importorskip("vllm")
    from cyllm.worker.engines.vllm_engine import VllmAsyncEngine

    eng = VllmAsyncEngine(
        spec(engine="vllm", engine_args={"tensor_parallel_size": 2, "tensor_paralel_size": 2}),
        default_folder(),
    )
    with pytest.raises(errors.NotLoadable, match="tensor_paralel_size"):
        eng.engine_args()
    ok = VllmAsyncEngine(
        spec(
            engine="vllm",
            engine_args={
                "tensor_parallel_size": 2,
                "pipeline_parallel_size": 2,
                "distributed_executor_backend": "ray",
            },
        ),
        default_folder(),
    ).engine_args()
    assert (ok["tensor_parallel_size"], ok["pipeline_parallel_size"]) == (2, 2)
    assert ok["distributed_executor_backend"] == "ray" and ok["max_num_seqs"] == 32


def test_a_cpu_engine_step_is_bounded_by_the_cores_unless_the_spec_says_otherwise(monkeypatch):
    pytest.importorskip("vllm")
    from cyllm import cores
    from cyllm.worker.engines import vllm_engine
    from cyllm.worker.engines.vllm_engine import VllmAsyncEngine

    def args(**kw):
        return VllmAsyncEngine(spec(engine="vllm", **kw), default_folder()).engine_args()

    for given, seqs, budget in [({0, 1}, 32, 256), (set(range(64)), 32, 2048), ({0}, 512, 512)]:
        monkeypatch.setattr(cores, "GIVEN", frozenset(given))
        assert vllm_engine.cpu_step_tokens(seqs) == budget
    monkeypatch.setattr(cores, "GIVEN", frozenset({0, 1}))
    assert args()["max_num_batched_tokens"] == 256
    assert args(max_batch_size=300)["max_num_batched_tokens"] == 300
    assert args(engine_args={"max_num_batched_tokens": 4096})["max_num_batched_tokens"] == 4096


def _ascend_checks() -> None:
    """The Ascend engine's device checks against a fake torch_npu.  Run in a fresh
    interpreter by the test below: renaming PyTorch's out-of-tree backend to "npu" (what
    importing the real torch_npu does first) cannot be undone, and would make every later
    optimizer in the process look for an NPU."""
    import torch

    from cyllm.worker.engines.ascend_engine import AscendEngine

    def fake(available: bool, count: int = 1) -> None:
        torch.npu = types.SimpleNamespace(
            is_available=lambda: available, device_count=lambda: count, current_device=lambda: 0
        )

    torch.utils.rename_privateuse1_backend("npu")
    sys.modules["torch_npu"] = types.ModuleType("torch_npu")
    fake(available=False)
    with pytest.raises(errors.NotLoadable, match="sees no Ascend NPU"):
        AscendEngine(spec(engine="ascend"), default_folder()).pick_device()
    fake(available=True, count=2)
    assert str(AscendEngine(spec(engine="ascend", device="npu:1"), default_folder()).pick_device()) == "npu:1"
    assert str(AscendEngine(spec(engine="ascend"), default_folder()).pick_device()) == "npu:0"
    with pytest.raises(errors.NotLoadable, match="2 NPU"):
        AscendEngine(spec(engine="ascend", device="npu:3"), default_folder()).pick_device()
    with pytest.raises(errors.NotLoadable, match="npu devices"):
        AscendEngine(spec(engine="ascend", device="cuda:0"), default_folder()).pick_device()


def test_ascend_engine_device_checks_against_a_fake_torch_npu():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.engines.test_factory import _ascend_checks; _ascend_checks(); print('checked')",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr[-3000:]


def test_vllm_ascend_needs_its_plugin():
    pytest.importorskip("vllm")
    from cyllm.worker.engines.vllm_engine import VllmAscendEngine, VllmCudaEngine

    with pytest.raises(errors.NotLoadable, match="vllm-ascend"):
        VllmAscendEngine(spec(engine="vllm_ascend"), default_folder())._check_platform()
    with pytest.raises(errors.NotLoadable, match="cuda platform"):
        VllmCudaEngine(spec(engine="vllm_cuda"), default_folder())._check_platform()


async def test_hybrid_skips_what_cannot_load_and_moves_a_failed_request_on():
    from cyllm.worker.engines.hybrid import HybridEngine

    cands = [
        EngineCandidate(engine="trtllm"),
        EngineCandidate(engine="fake"),
        EngineCandidate(engine="fake", engine_args={"token_delay_s": 0.001}),
    ]
    eng = HybridEngine(spec(engine="hybrid", candidates=cands, replicas=2), WorkerSettings().cache_dir)
    card = await eng.load()
    assert card.engine == "hybrid[fake@auto,fake@auto]" and card.max_batch_size == 64
    assert "trtllm@auto" in eng.health().detail and "tensorrt_llm" in eng.health().detail

    first = eng.members[0].engine

    async def broken(request):
        raise errors.EngineError("device lost")
        yield

    first.generate = broken  # the least loaded member fails before any output
    request = GenerationRequest("r", prompt="hi", sampling=SamplingParams(max_tokens=3))
    text = "".join([e.text async for e in eng.generate(request) if isinstance(e, TextDelta)])
    assert text == "w0 w1 w2"
    await eng.close()


async def test_hybrid_with_nothing_loadable_says_why():
    from cyllm.worker.engines.hybrid import HybridEngine

    cands = [EngineCandidate(engine="trtllm"), EngineCandidate(engine="ascend")]
    eng = HybridEngine(spec(engine="hybrid", candidates=cands), WorkerSettings().cache_dir)
    with pytest.raises(errors.NotLoadable) as info:
        await eng.load()
    assert "tensorrt_llm" in info.value.message and "torch_npu" in info.value.message


def test_spec_validation():
    with pytest.raises(ValueError, match="candidates"):
        ModelSpec(id="x", engine="hybrid", path=default_folder())
    with pytest.raises(ValueError, match="separates"):
        ModelSpec(id="a:b", engine="fake")
    with pytest.raises(ValueError, match="adapter name"):
        ModelSpec(id="a", engine="fake", adapters={"bad name": default_folder()})
