"""Engine factory: the engine named in a model's spec, imported only when chosen."""

from __future__ import annotations

import importlib
from pathlib import Path

from cyllm.worker.engines.base import AbstractEngine
from cyllm.worker.settings import ModelSpec

# name -> (module, class).  Heavy libraries are imported inside these modules only.
ENGINES: dict[str, tuple[str, str]] = {
    "transformers": ("cyllm.worker.engines.transformers_engine", "TransformersEngine"),
    "fake": ("cyllm.worker.engines.fake", "FakeEngine"),
}


def create_engine(spec: ModelSpec, cache_dir: Path) -> AbstractEngine:
    """Build (not load) the engine for ``spec``; GGUF sources are converted first."""
    module_name, class_name = ENGINES[spec.engine]
    cls = getattr(importlib.import_module(module_name), class_name)
    if spec.engine == "fake":
        return cls(spec)
    from cyllm.worker import model_files

    return cls(spec, model_files.resolve(spec, cache_dir))
