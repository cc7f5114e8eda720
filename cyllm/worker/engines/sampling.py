"""Per-row token sampling: each request keeps its own temperature, top-p and seed, and
its output rules (penalties, logit bias, a length floor), applied to its row's logits
before sampling by the engines that sample token by token (transformers, llama.cpp).

The rules mean what they mean in OpenAI's API and in vLLM, so a request gets the same
treatment on every engine: ``presence_penalty`` subtracts from the logit of every token
already generated, ``frequency_penalty`` that times the token's count; ``repetition_penalty``
divides positive logits (multiplies negative ones) of tokens in the prompt or the output;
``logit_bias`` adds; ``min_tokens`` and ``ignore_eos`` forbid the end tokens (before that
many tokens, or always)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import torch

from cyllm.worker.engines.types import SamplingParams, TokenLogprob


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int]:
    """Pick one token per row of ``logits`` [B, V]."""
    chosen = logits.argmax(dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.temperature == 0 or gen is None:
            continue
        assert p.temperature is not None and p.top_p is not None  # resolved by SamplingDefaults.apply
        probs = torch.softmax(logits[row] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Drop a token when the mass before it already reaches top_p (keeps at least one).
            drop = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]
    return chosen.tolist()


class OutputRules:
    """One sequence's output rules, following the tokens it generates."""

    def __init__(
        self,
        params: SamplingParams,
        prompt: Sequence[int],
        end_ids: Collection[int],
        generated: Sequence[int] = (),
    ) -> None:
        self.p = params
        self.end_ids = list(end_ids)
        self.counts: Counter[int] = Counter(generated)
        self.made = len(generated)
        self.seen = set(prompt) | set(generated)  # for the repetition penalty
        self.bias = dict(params.logit_bias)

    @classmethod
    def of(
        cls,
        params: SamplingParams,
        prompt: Sequence[int],
        end_ids: Collection[int],
        generated: Sequence[int] = (),
    ) -> OutputRules | None:
        return cls(params, prompt, end_ids, generated) if params.rules() else None

    def apply(self, logits: torch.Tensor) -> None:
        """Change one row of float32 logits in place."""
        p = self.p
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[ids]
            logits[ids] = torch.where(
                picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty
            )
        if (p.frequency_penalty or p.presence_penalty) and self.counts:
            ids = torch.tensor(list(self.counts), device=logits.device)
            counts = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
            logits[ids] -= p.frequency_penalty * counts + p.presence_penalty
        for token, bias in self.bias.items():
            logits[token] += bias
        if p.ignore_eos or self.made < p.min_tokens:
            logits[self.end_ids] = float("-inf")

    def accept(self, token: int) -> None:
        self.counts[token] += 1
        self.made += 1
        self.seen.add(token)


class RowProcessor(Protocol):
    def apply(self, logits: torch.Tensor) -> None:
        """Change one row of float32 logits in place."""


def process_rows(logits: torch.Tensor, processors: Sequence[RowProcessor | None]) -> torch.Tensor:
    """``logits`` [B, V] with each row's processor (output rules, a grammar matcher)
    applied; float32 where any applies."""
    if not any(processors):
        return logits
    logits = logits.float()
    for row, processor in enumerate(processors):
        if processor is not None:
            processor.apply(logits[row])
    return logits


def token_logprob(logits: torch.Tensor, token: int, top: int, decode: Callable[[int], str]) -> TokenLogprob:
    """``token``'s log probability under one row of (processed, float) logits, with the
    ``top`` most likely tokens; tokens a grammar or bias ruled out are never listed."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: tuple[tuple[int, float, str], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        alternatives = tuple(
            (i, v, decode(i)) for v, i in zip(values.tolist(), ids.tolist()) if math.isfinite(v)
        )
    chosen = float(logprobs[token])
    return TokenLogprob(token, chosen if math.isfinite(chosen) else -9999.0, decode(token), alternatives)
