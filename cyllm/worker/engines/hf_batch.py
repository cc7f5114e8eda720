"""A running batch for a Hugging Face causal LM: one left-padded KV cache shared by
sequences that joined at different times (continuous batching).

New sequences are prefilled together and then merged into the running batch by
left-padding the shorter cache; finished sequences are dropped by indexing the batch
dimension, and columns that became padding for every row are trimmed.  Every decode
step is one forward pass for all running sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

# Spare positions a layer's KV buffer keeps past its length.
_ROOM = 128


class CausalLM(Protocol):
    """A Hugging Face causal LM, or a ``PeftModel`` around one, as a batch runs it."""

    @property
    def device(self) -> torch.device: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class GrowableLayer(DynamicLayer):
    """KV storage with spare room at the end: a decode step writes its token in place.

    transformers' DynamicLayer concatenates the whole cache with the new token on every
    step; on CPU that copy was a third of a decode step at 32 sequences.  Here the
    buffer grows by chunks and ``keys``/``values`` are views of its filled part.
    """

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None
    _len = 0

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowableLayer:
        layer = cls()
        layer.update(keys, values)
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        need = self._len + key_states.shape[-2]
        if self._kbuf is None or need > self._kbuf.shape[-2]:
            self._kbuf = self._grow(self._kbuf, key_states, need)
            self._vbuf = self._grow(self._vbuf, value_states, need)
        assert self._vbuf is not None
        self._kbuf[:, :, self._len : need] = key_states
        self._vbuf[:, :, self._len : need] = value_states
        self._len = need
        self.keys, self.values = self._kbuf[:, :, :need], self._vbuf[:, :, :need]
        return self.keys, self.values

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, need: int) -> torch.Tensor:
        shape = (*new.shape[:2], need + _ROOM, new.shape[-1])
        buf = new.new_empty(shape)
        if old is not None and self._len:
            buf[:, :, : self._len] = old[:, :, : self._len]
        return buf


class GrowableCache(DynamicCache):
    """A DynamicCache made of :class:`GrowableLayer` (optionally pre-filled)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        if layers is None:
            Cache.__init__(self, layer_class_to_replicate=GrowableLayer)
        else:
            Cache.__init__(self, layers=[GrowableLayer.holding(k, v) for k, v in layers])


class KVBatch:
    """Tensors of the running batch; rows are in the order of the engine's running list."""

    def __init__(self, cache: GrowableCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [B, T] 1 for real tokens, 0 for left padding
        self.positions = positions  # [B] position id of the next token

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for layer in self.cache.layers:
            # a filled key/value layer: the batch was prefilled (a linear-attention
            # layer, which keeps no keys, cannot be batched here)
            assert isinstance(layer, CacheLayerMixin) and layer.keys is not None and layer.values is not None
            out.append((layer.keys, layer.values))
        return out

    # -- building ---------------------------------------------------------------------

    @classmethod
    @torch.inference_mode()
    def prefill(
        cls, model: CausalLM, prompts: Sequence[Sequence[int]], pad_id: int, **extra: Any
    ) -> tuple[KVBatch, torch.Tensor]:
        """Run the prompts in one forward pass; return the batch and last-token logits.
        ``extra`` goes to the model's forward (PEFT's ``adapter_names``)."""
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = GrowableCache()
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        lengths = mask.sum(-1)
        return cls(out.past_key_values, mask, lengths), out.logits[:, -1, :].float()

    def merge(self, other: KVBatch) -> KVBatch:
        """Append ``other``'s rows after this batch's, left-padding the shorter cache."""
        width = max(self.mask.shape[1], other.mask.shape[1])

        def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([_left_pad(a, width, 2), _left_pad(b, width, 2)])

        layers = [(joined(k, ok), joined(v, ov)) for (k, v), (ok, ov) in zip(self.layers(), other.layers())]
        mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        positions = torch.cat([self.positions, other.positions])
        return KVBatch(GrowableCache(layers), mask, positions)

    def keep(self, rows: Sequence[int]) -> KVBatch:
        """Keep only ``rows`` (in that order) and trim columns that are padding for all."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(0).nonzero()
        cut = int(used[0]) if used.numel() else mask.shape[1]
        layers = [
            (k.index_select(0, index)[:, :, cut:], v.index_select(0, index)[:, :, cut:])
            for k, v in self.layers()
        ]
        return KVBatch(GrowableCache(layers), mask[:, cut:], self.positions.index_select(0, index))

    # -- stepping ---------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, model: CausalLM, tokens: torch.Tensor, **extra: Any) -> torch.Tensor:
        """Feed one token per row; return next-token logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        out = model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **extra,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        return out.logits[:, -1, :].float()


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
