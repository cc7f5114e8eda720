"""Embeddings from a Hugging Face causal LM's backbone: the last hidden states (no
vocabulary projection) mean-pooled over each text's tokens and L2-normalised, texts of
similar length batched together within a token budget."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def base_backbone(model: Any) -> Iterator[torch.nn.Module]:
    """The transformer under ``model``'s language-model head, with the base weights: a
    PEFT model's adapters are switched off meanwhile."""
    if not hasattr(model, "get_base_model"):
        yield model.base_model
        return
    with model.disable_adapter():
        yield model.get_base_model().base_model


def pooled(backbone: torch.nn.Module, ids: list[list[int]], pad_id: int, device: torch.device,
           dimensions: int = 0, token_budget: int = 8192) -> list[list[float]]:
    """One vector per row of ``ids`` (``dimensions``: the first that many, normalised)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together
    vectors: dict[int, list[float]] = {}
    while order:
        batch, width = [], 0
        while order and (not batch or max(width, len(ids[order[0]])) * (len(batch) + 1)
                         <= token_budget):
            width = max(width, len(ids[order[0]]))
            batch.append(order.pop(0))
        tokens = torch.full((len(batch), width), pad_id, device=device)
        mask = torch.zeros((len(batch), width), dtype=torch.long, device=device)
        for row, i in enumerate(batch):
            tokens[row, :len(ids[i])] = torch.tensor(ids[i], device=device)
            mask[row, :len(ids[i])] = 1
        states = backbone(input_ids=tokens, attention_mask=mask).last_hidden_state.float()
        means = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        if dimensions:
            means = means[:, :dimensions]
        for i, v in zip(batch, torch.nn.functional.normalize(means, dim=-1).tolist()):
            vectors[i] = v
    return [vectors[i] for i in range(len(ids))]
