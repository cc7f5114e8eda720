"""Embeddings with transformers: a model's last hidden states (no vocabulary
projection) pooled over each text's tokens, texts of similar length batched together
within a token budget.

Three users: the transformers engine pools the causal LM it serves (its base weights);
``FolderEmbedder`` loads a folder's backbone beside an engine that cannot pool its own
weights (vLLM), or as the whole of an embedding model (``task: embed``).  The pooling
is what the folder says where it is a sentence-transformers folder (``modules.json``:
its Pooling module's mode), else the mean; vectors are always L2-normalised, as
OpenAI's are (and vLLM's by default), so a dot product is the cosine similarity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cyllm import errors
from cyllm.worker.devices import cpu_has_bfloat16
from cyllm.worker.engines.compute_thread import ComputeThread
from cyllm.worker.engines.planning import checked_ids
from cyllm.worker.settings import ModelSpec

# sentence-transformers' Pooling config keys -> our modes (one of them is set).
_ST_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
}


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean | cls | last | max

    @classmethod
    def of_folder(cls, folder: Path) -> Pooling:
        """What a sentence-transformers folder declares; the default elsewhere.  A
        pooling we do not do (weighted mean, several modes at once) is refused by name."""
        try:
            modules = json.loads((folder / "modules.json").read_text())
        except (OSError, ValueError):
            return cls()
        for module in modules if isinstance(modules, list) else []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
                try:
                    config = json.loads((folder / str(module.get("path", "")) / "config.json").read_text())
                except (OSError, ValueError) as exc:
                    raise errors.NotLoadable(f"{folder}: its Pooling module's config: {exc}") from exc
                on = [k for k, v in config.items() if k.startswith("pooling_mode") and v]
                if len(on) != 1 or on[0] not in _ST_MODES:
                    raise errors.NotLoadable(
                        f"{folder}: pooling {', '.join(on) or 'none'} is not supported "
                        f"(one of {', '.join(_ST_MODES)})"
                    )
                return cls(_ST_MODES[on[0]])
        return cls()


@contextlib.contextmanager
def base_backbone(model: Any) -> Iterator[torch.nn.Module]:
    """The transformer under ``model``'s language-model head, with the base weights: a
    PEFT model's adapters are switched off meanwhile."""
    if not hasattr(model, "get_base_model"):
        yield model.base_model
        return
    with model.disable_adapter():
        yield model.get_base_model().base_model


def pooled(
    backbone: torch.nn.Module,
    ids: list[list[int]],
    pad_id: int,
    device: torch.device,
    dimensions: int = 0,
    token_budget: int = 8192,
    pooling: Pooling = Pooling(),
) -> list[list[float]]:
    """One unit vector per row of ``ids`` (``dimensions``: the first that many values,
    normalised)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together
    vectors: dict[int, list[float]] = {}
    while order:
        batch: list[int] = []
        width = 0
        while order and (not batch or max(width, len(ids[order[0]])) * (len(batch) + 1) <= token_budget):
            width = max(width, len(ids[order[0]]))
            batch.append(order.pop(0))
        tokens = torch.full((len(batch), width), pad_id, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            tokens[row, : len(ids[i])] = torch.tensor(ids[i], device=device)
            mask[row, : len(ids[i])] = 1
        with torch.inference_mode():
            states = backbone(input_ids=tokens, attention_mask=mask).last_hidden_state.float()
        out = _pool(states, mask, pooling.mode)
        if dimensions:
            out = out[:, :dimensions]
        for i, v in zip(batch, torch.nn.functional.normalize(out, dim=-1).tolist()):
            vectors[i] = v
    return [vectors[i] for i in range(len(ids))]


def _pool(states: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "cls":
        return states[:, 0]
    if mode == "last":  # rows are right-padded
        return states[torch.arange(states.shape[0]), mask.sum(1) - 1]
    if mode == "max":
        return states.masked_fill(mask[..., None] == 0, float("-inf")).max(1).values
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class FolderEmbedder:
    """A Hugging Face folder's backbone (``AutoModel``: an encoder, or a causal LM without
    its head) loaded by transformers on first use, run one batch at a time on a thread
    of its own (``compute_thread``: why not the event loop's pool)."""

    def __init__(self, folder: Path, device: str, dtype: str, max_context: int | None = None) -> None:
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.max_context = max_context
        self._load_lock = asyncio.Lock()
        self._thread = ComputeThread(f"embed-{folder.name}")
        self.model: Any = None

    async def load(self) -> None:
        async with self._load_lock:
            if self.model is None:
                await self._thread.run(self._load_blocking)

    def _load_blocking(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from cyllm.worker.model_files import context_length

        self.pooling = Pooling.of_folder(self.folder)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        model = AutoModel.from_pretrained(self.folder, dtype=getattr(torch, self.dtype))
        self.context_length = context_length(model.config, self.max_context)
        self.width = int(model.config.hidden_size)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self.model = model.to(self.device).eval()

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        await self.load()
        ids = checked_ids(
            lambda t: self.tokenizer(t)["input_ids"], texts, self.context_length, self.width, dimensions
        )

        def run() -> list[list[float]]:
            return pooled(self.model, ids, self.pad_id, self.device, dimensions, pooling=self.pooling)

        return await self._thread.run(run), sum(map(len, ids))

    def close(self) -> None:
        self.model = None
        self._thread.close()


def embedder_for(spec: ModelSpec, folder: Path, device: str) -> FolderEmbedder:
    """``spec``'s weights as an embedder on ``device`` ('cpu', an accelerator, or 'auto':
    CUDA where there is one), in its dtype (``auto``: bfloat16 on accelerators and on
    CPUs with native bfloat16)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = spec.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device != "cpu" or cpu_has_bfloat16() else "float32"
    return FolderEmbedder(folder, device, dtype, spec.max_context)
