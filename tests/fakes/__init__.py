"""Test doubles of libraries and servers this machine cannot run (TensorRT-LLM, MindIE
Server, torch_npu, vllm-ascend).  Each reproduces the API surface our adapter uses —
names, argument names, result shapes, streaming, cancellation — over a toy "model" that
emits the words ``w0 w1 w2 ...``.  They are for tests only and prove the adapters speak
those APIs, not that the hardware path works."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).parent


def word(i: int, prefix: str = "w") -> str:
    return ("" if i == 0 else " ") + f"{prefix}{i}"


@contextmanager
def on_path(*modules: str) -> Iterator[None]:
    """``import tensorrt_llm`` (and the other ``modules``) finds the fakes here, until exit."""
    sys.path.insert(0, str(HERE))
    try:
        yield
    finally:
        sys.path.remove(str(HERE))
        for name in list(sys.modules):
            if name.split(".")[0] in modules:
                del sys.modules[name]
