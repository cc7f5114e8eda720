"""What this machine computes on: the accelerator a worker serves and trains with, and
whether its CPU has native bfloat16 (inference and training choose their precision by
it).  The engines and the training job read it here, not from the engine factory."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def detect_accelerator() -> str:
    """'cuda', 'npu' or 'cpu': what this process can run on."""
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch
            import torch_npu  # noqa: F401  (registers torch.npu)

            if torch.npu.is_available():  # type: ignore[attr-defined]  # torch_npu patches torch at import
                return "npu"
        except Exception:  # a broken CANN install is "no NPU", not a crash
            pass
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


def device_count(device: str) -> int:
    """How many processes a job may run on ``device`` (a worker's training_device, or its
    accelerator): every GPU or NPU this process sees for 'cuda'/'npu', one for a named
    one (cuda:3), the usable cores for 'cpu'."""
    if ":" in device:
        return 1
    if device in ("cuda", "npu"):
        import torch

        return int(torch.cuda.device_count() if device == "cuda" else torch.npu.device_count())  # type: ignore[attr-defined]
    return len(os.sched_getaffinity(0))


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes in bfloat16 natively (Linux's feature flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
