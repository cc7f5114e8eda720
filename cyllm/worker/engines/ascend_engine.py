"""The generic Ascend engine: the transformers engine (continuous batching, LoRA) on an
Ascend NPU through PyTorch's ``torch_npu`` backend (``device: npu`` or ``npu:N``).

``import torch_npu`` registers the ``npu`` device with PyTorch; after that the model,
its KV cache and sampling run there as they do on CUDA.  Default dtype float16.
Not yet run on Ascend hardware (see the README's status table): the device checks are
tested against a fake ``torch_npu``; the engine code itself is the transformers engine,
run for real on CPU.
"""

from __future__ import annotations

import importlib

import torch

from cyllm import errors
from cyllm.worker.engines.transformers_engine import TransformersEngine


class AscendEngine(TransformersEngine):
    name = "ascend"

    def pick_device(self) -> torch.device:
        try:
            importlib.import_module("torch_npu")
        except ImportError as exc:
            raise errors.NotLoadable(
                "engine 'ascend' needs torch_npu (pip install torch-npu, with the CANN toolkit)"
            ) from exc
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            raise errors.NotLoadable("engine 'ascend': torch_npu is installed but sees no Ascend NPU")
        device = self.spec.device
        if device in ("auto", "npu"):
            device = f"npu:{npu.current_device()}"
        if not device.startswith("npu"):
            raise errors.NotLoadable(f"engine 'ascend' runs on npu devices, not {device!r}")
        index = int(device.partition(":")[2] or 0)
        if index >= npu.device_count():
            raise errors.NotLoadable(
                f"engine 'ascend': {device} requested, {npu.device_count()} NPU(s) visible"
            )
        return torch.device(device)
