"""HybridEngine: one model served by several engines or devices, as one engine.

The spec's ``candidates`` are tried in order at load time (an engine whose library or
hardware is missing, or that fails to load the model, is skipped with its reason
logged and shown in health); the first ``replicas`` that load are kept.  Each request
goes to the healthy member with the lowest load (running + waiting per batch slot);
if a member fails before producing anything, the request moves to the next one
(``protocol.failover``).

Example: ``candidates: [{engine: vllm_cuda, device: cuda:0}, {engine: transformers,
device: cuda:1}, {engine: transformers, device: cpu}]`` with ``replicas: 2`` serves from
two GPUs when both load, and from whatever does when not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from cyllm import errors
from cyllm.protocol import failover
from cyllm.worker.engines import compute_thread
from cyllm.worker.engines.base import AbstractEngine
from cyllm.worker.engines.types import EngineHealth, Event, GenerationRequest, ModelCard
from cyllm.worker.settings import ModelSpec

log = logging.getLogger(__name__)

# A member that fails before its first event hands the request to the next; once it has
# sent something the request fails with it (a member's stream cannot be continued).
MEMBERS = failover.Rule(
    moves_on=(errors.EngineError, errors.Unavailable), blames=lambda exc: False, what="hybrid member"
)


@dataclass
class Member:
    label: str
    engine: AbstractEngine
    card: ModelCard


class HybridEngine(AbstractEngine):
    """A composite, not an adapter over a library: it hands the whole request to a
    member engine, whose own skeleton (``base.Engine``) plans and runs it."""

    name = "hybrid"

    def __init__(self, spec: ModelSpec, cache_dir: Path, cpu_engine: str = "transformers") -> None:
        self.spec = spec
        self.cache_dir = cache_dir
        self.cpu_engine = cpu_engine
        self.members: list[Member] = []
        self.skipped: list[str] = []

    async def load(self) -> ModelCard:
        from cyllm.worker.engines.factory import create_engine

        for cand in self.spec.candidates:
            label = f"{cand.engine}@{cand.device}"
            sub = self.spec.model_copy(
                update={
                    "engine": cand.engine,
                    "device": cand.device,
                    "engine_args": cand.engine_args,
                    "candidates": [],
                    "replicas": 1,
                }
            )
            try:
                engine = await compute_thread.once(create_engine, sub, self.cache_dir, self.cpu_engine)
                card = await engine.load()
            except Exception as exc:  # missing library, no device, load failure: next one
                log.warning("hybrid %s: candidate %s skipped: %s", self.spec.id, label, exc)
                self.skipped.append(f"{label}: {exc}")
                continue
            self.members.append(Member(label, engine, card))
            log.info("hybrid %s: serving on %s", self.spec.id, label)
            if len(self.members) == self.spec.replicas:
                break
        if not self.members:
            raise errors.NotLoadable(
                f"no candidate engine could load {self.spec.id!r}: " + "; ".join(self.skipped)
            )
        cards = [m.card for m in self.members]
        return ModelCard(
            self.spec.id,
            min(c.context_length for c in cards),
            "hybrid[" + ",".join(m.label for m in self.members) + "]",
            sum(c.max_batch_size for c in cards),
            ",".join(c.device for c in cards),
            int(time.time()),
        )

    def _ranked(self, request: GenerationRequest) -> list[Member]:
        def load(m: Member) -> float:
            h = m.engine.health()
            return (h.running + h.waiting) / max(1, m.card.max_batch_size)

        usable = [
            m
            for m in self.members
            if m.engine.health().healthy
            and (request.adapter is None or request.adapter in m.engine.adapters())
        ]
        return sorted(usable, key=load)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        self.check_adapter(request)
        ranked = self._ranked(request)
        if not ranked:
            raise errors.Unavailable(f"no healthy engine for {self.spec.id} on this worker")
        members = failover.InTurn([failover.Named(f"{self.spec.id}@{m.label}", m.engine) for m in ranked])
        events = failover.stream(members, lambda m: m.target.generate(request), MEMBERS)
        async with aclosing(events) as stream:
            async for event in stream:
                yield event

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        """The least busy healthy member's (every member embeds, or refuses by name)."""
        ranked = self._ranked(GenerationRequest(request_id=""))
        if not ranked:
            raise errors.Unavailable(f"no healthy engine for {self.spec.id} on this worker")
        return await ranked[0].engine.embed(texts, dimensions)

    def health(self) -> EngineHealth:
        hs = [m.engine.health() for m in self.members]
        down = [f"{m.label}: {h.detail or 'unhealthy'}" for m, h in zip(self.members, hs) if not h.healthy]
        return EngineHealth(
            healthy=any(h.healthy for h in hs),
            running=sum(h.running for h in hs),
            waiting=sum(h.waiting for h in hs),
            tokens_generated=sum(h.tokens_generated for h in hs),
            detail="; ".join(down + [f"skipped {s}" for s in self.skipped]),
        )

    async def add_adapter(self, name: str, path: Path) -> None:
        for m in self.members:
            await m.engine.add_adapter(name, path)

    async def remove_adapter(self, name: str) -> None:
        for m in self.members:
            await m.engine.remove_adapter(name)

    def adapters(self) -> list[str]:
        names = [set(m.engine.adapters()) for m in self.members]
        return sorted(set.union(*names)) if names else []

    async def close(self) -> None:
        for m in self.members:
            await m.engine.close()
