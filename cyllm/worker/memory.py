"""The memory manager: what a model will take before it is loaded, and what is left.

A model's estimate is its weights plus the KV cache its engine reserves:

- weights: the tensors' element count from the safetensors headers (no weights read)
  times the bytes of the dtype the engine will load them in; a GGUF file's size;
- KV cache: ``2 x layers x kv_heads x head_dim x bytes`` per token, times the tokens the
  engine holds — for vLLM its pool, reserved up front (``cpu_kvcache_space_gib`` on CPU,
  ``gpu_memory_utilization`` of the GPU on CUDA); for llama.cpp ``n_ctx x instances``;
  for the transformers engine, which grows its cache with the sequences, a full batch of
  ``max_batch_size`` sequences of ``default_max_tokens + 1024`` tokens each (a long
  prompt and its answer; capped at the context).  A batch of full-context sequences can
  exceed that: lower ``max_batch_size`` or ``max_context`` where that matters.

The worker's budget is ``memory_limit_gib`` when set, else the device's memory at start
(CUDA: free memory of the first GPU; CPU: MemAvailable) times ``memory_fraction``.  A
load must fit both the budget minus the loaded models' estimates and, on CPU, the
memory actually available now.  One budget per worker, for its main device.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from cyllm.worker.model_files import folder_context_length
from cyllm.worker.settings import ModelSpec

GIB = 1024**3
_DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


@dataclass(frozen=True)
class Estimate:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def describe(self) -> str:
        return f"{gib(self.total)} (weights {gib(self.weights)} + KV cache {gib(self.kv_cache)})"


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def safetensors_elements(folder: Path) -> tuple[int, str]:
    """(element count, the checkpoint's most common dtype) from the headers only."""
    total = 0
    by_dtype: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(info["shape"])
            total += n
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + n
    if not by_dtype:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return total, max(by_dtype, key=by_dtype.__getitem__)


def kv_bytes_per_token(config: dict, dtype_bytes: int) -> int:
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or text.get("hidden_size", 0) // max(1, heads))
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def load_dtype_bytes(spec: ModelSpec, device_type: str, checkpoint_dtype: str) -> int:
    if spec.dtype != "auto":
        return _DTYPE_BYTES[spec.dtype]
    if spec.engine in ("vllm", "vllm_cuda", "vllm_ascend", "trtllm"):
        return _DTYPE_BYTES.get(checkpoint_dtype, 2)
    return 2 if device_type in ("cuda", "npu") else 4  # the transformers engine's defaults


def estimate_folder(spec: ModelSpec, folder: Path, device_type: str, device_total: int) -> Estimate:
    elements, ckpt_dtype = safetensors_elements(folder)
    nbytes = load_dtype_bytes(spec, device_type, ckpt_dtype)
    config = json.loads((folder / "config.json").read_text())
    weights = elements * nbytes
    context = folder_context_length(folder, spec.max_context)
    per_token = kv_bytes_per_token(config, nbytes)
    args = spec.engine_args
    if spec.engine.startswith("vllm"):
        if device_type == "cpu":
            kv = int(float(args.get("cpu_kvcache_space_gib", 1)) * GIB)
        else:
            kv = max(0, int(float(args.get("gpu_memory_utilization", 0.9)) * device_total) - weights)
    else:
        kv = per_token * min(context, spec.default_max_tokens + 1024) * spec.max_batch_size
    return Estimate(weights, kv)


def estimate_gguf(spec: ModelSpec, file: Path) -> Estimate:
    """llama.cpp: the file is what it maps; its KV cache is n_ctx per instance (f16)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(file))

    def field(name: str) -> int | None:
        f = reader.fields.get(name)
        return int(f.parts[f.data[0]][0]) if f is not None else None

    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    layers = field(f"{arch}.block_count") or 0
    heads = field(f"{arch}.attention.head_count") or 1
    kv_heads = field(f"{arch}.attention.head_count_kv") or heads
    width = field(f"{arch}.embedding_length") or 0
    n_ctx = spec.max_context or field(f"{arch}.context_length") or 2048
    instances = int(spec.engine_args.get("instances", 1))
    kv = 2 * layers * kv_heads * (width // heads) * 2 * n_ctx * instances
    return Estimate(file.stat().st_size, kv)


def device_memory(device_type: str) -> tuple[int, int]:
    """(free, total) bytes of the main device right now."""
    if device_type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(0)
        return int(free), int(total)
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
    return info.get("MemAvailable", info["MemFree"]), info["MemTotal"]


class MemoryBudget:
    """The accounting: a limit, and the estimates of what is loaded."""

    def __init__(self, device_type: str, limit_gib: float | None, fraction: float) -> None:
        self.device_type = device_type
        free, self.device_total = device_memory(device_type)
        self.fraction = fraction
        self.limit = int(limit_gib * GIB) if limit_gib else int(free * fraction)
        self.explicit = limit_gib is not None
        self.used: dict[str, Estimate] = {}

    @property
    def used_bytes(self) -> int:
        return sum(e.total for e in self.used.values())

    def free_bytes(self) -> int:
        free = self.limit - self.used_bytes
        if not self.explicit or self.device_type == "cpu":
            free = min(free, int(device_memory(self.device_type)[0] * self.fraction))
        return max(0, free)
