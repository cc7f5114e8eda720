"""``cyllm serve MODEL``: what MODEL names, as a model spec.

MODEL is a local Hugging Face folder (``config.json`` in it), a GGUF file, or a Hugging
Face Hub id (``org/name``, optionally ``@revision``), downloaded once into the Hub cache
by ``huggingface_hub`` (progress bars, resumed after an interruption; ``HF_TOKEN``,
``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` work as everywhere else).  Only what
serving needs is fetched: the config, the tokenizer and the safetensors weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cyllm.worker.settings import ModelSpec

HUB_ID = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}(@[A-Za-z0-9._/-]{1,100})?$"
)
# What a served folder needs; never *.bin/*.pt (pickles), *.py (remote code), *.onnx, *.h5 or
# the other formats a Hub repository often carries beside the safetensors.
SERVING_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class SourceError(Exception):
    """MODEL names nothing servable; the message says what was looked for."""


def name_of(model: str) -> str:
    """The id a model is served under when no ``--served-model-name`` is given: a Hub
    id as written (as ``vllm serve`` does), else the folder's or file's name."""
    if HUB_ID.match(model) and not Path(model).exists():
        return model.split("@")[0]
    path = Path(model).expanduser()
    return path.stem if path.suffix == ".gguf" else path.name


def model_spec(model: str, name: str | None, **fields: Any) -> ModelSpec:
    """The spec for MODEL (a Hub id downloaded first); ``fields``: the command's flags,
    None for those not given."""
    source = _source(model)
    served = name or name_of(model)
    try:
        return ModelSpec(
            id=re.sub(r"[^A-Za-z0-9._/-]", "-", served),
            **source,
            **{k: v for k, v in fields.items() if v is not None},
        )
    except ValueError as exc:
        raise SourceError(str(exc)) from None


def _source(model: str) -> dict[str, Any]:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} is a folder without config.json: not a Hugging Face model folder")
        return {"path": path.resolve()}
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"{path} is a file but not a .gguf")
        return {"gguf": str(path.resolve())}
    if path.suffix == ".gguf" or model.startswith((".", "/", "~")):
        raise SourceError(f"{model!r}: no such file or folder")
    if HUB_ID.match(model):
        return {"path": download(model)}
    raise SourceError(f"{model!r} is neither a local folder, a .gguf file nor a Hub id (org/name)")


def download(model: str) -> Path:
    """The Hub repository's serving files in the local Hub cache (fetched if missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = model.partition("@")
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=SERVING_FILES))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"could not download {model} from the Hub: {first}") from None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise SourceError(
            f"{model} on the Hub has no config.json and safetensors weights "
            "(GGUF-only repositories: download the .gguf and serve the file)"
        )
    return folder
