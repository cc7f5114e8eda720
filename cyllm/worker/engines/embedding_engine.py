"""An embedding model (``task: embed``): a Hugging Face encoder folder (BERT, E5, BGE,
GTE, …, or any ``AutoModel``) that answers ``/v1/embeddings`` and refuses generation by
name.  Pooled as the folder's sentence-transformers config says (``hf_embed``)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from cyllm import errors
from cyllm.worker.engines.base import AbstractEngine, RequestTracker
from cyllm.worker.engines.hf_embed import embedder_for
from cyllm.worker.engines.types import EngineHealth, Event, GenerationRequest, ModelCard
from cyllm.worker.settings import ModelSpec


class EmbeddingEngine(AbstractEngine):
    name = "embedding"

    def __init__(self, spec: ModelSpec, model_dir: Path) -> None:
        self.spec = spec
        self.tracker = RequestTracker()
        self.embedder = embedder_for(spec, model_dir, spec.device)

    async def load(self) -> ModelCard:
        try:
            await self.embedder.load()
        except errors.CyllmError:
            raise
        except Exception as exc:  # transformers' own errors on a folder it cannot read
            raise errors.NotLoadable(f"model {self.spec.id!r}: {exc}") from exc
        return ModelCard(
            self.spec.id,
            self.embedder.context_length,
            self.name,
            self.spec.max_batch_size,
            str(self.embedder.device),
            int(time.time()),
        )

    async def embed(self, texts: Sequence[str], dimensions: int = 0) -> tuple[list[list[float]], int]:
        vectors, tokens = await self.embedder.embed(texts, dimensions)
        self.tracker.tokens_generated += tokens  # progress, as generated tokens are elsewhere
        return vectors, tokens

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        raise errors.InvalidRequest(
            f"model {self.spec.id!r} is an embedding model (task: embed); it answers "
            "/v1/embeddings, not generation",
            param="model",
        )
        yield  # pragma: no cover  (an async generator that refuses at once)

    def health(self) -> EngineHealth:
        return self.tracker.health("" if self.embedder.model is not None else "closed")

    async def close(self) -> None:
        self.embedder.close()
