"""Test doubles of libraries and servers this machine cannot run (TensorRT-LLM, MindIE
Server, torch_npu, vllm-ascend).  Each reproduces the API surface our adapter uses —
names, argument names, result shapes, streaming, cancellation — over a toy "model" that
emits the words ``w0 w1 w2 ...``.  They are for tests only and prove the adapters speak
those APIs, not that the hardware path works."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent


def word(i: int, prefix: str = "w") -> str:
    return ("" if i == 0 else " ") + f"{prefix}{i}"


def on_path() -> None:
    """Make ``import tensorrt_llm`` and friends find the fakes in this folder."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
