"""The prompt cache: finished responses to deterministic requests, replayed on a repeat.

Keys are SHA-256 over the model, the sampling parameters and the input, so two
requests share an entry only when they would produce the same output.  Only requests
with temperature 0 or a fixed seed are cached; ``PromptCache`` is the interface and
``InMemoryPromptCache`` (LRU, TTL, bounded entries) the embedded backend.
"""

from __future__ import annotations

import abc
import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from google.protobuf import json_format

from cyllm.protocol import pb


@dataclass(frozen=True)
class CachedResponse:
    chunks: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def is_deterministic(request: pb.GenerateRequest) -> bool:
    s = request.sampling
    greedy = s.HasField("temperature") and s.temperature == 0
    return greedy or s.HasField("seed")


def cache_key(request: pb.GenerateRequest, tenant: str = "") -> str:
    """SHA-256 of tenant + model + sampling + input, in a canonical JSON form.  The
    tenant is part of it: a shared entry would answer faster for a prompt someone else
    sent, which tells one tenant what another asked."""
    canonical = pb.GenerateRequest(model=request.model, sampling=request.sampling)
    if request.WhichOneof("input") == "messages":
        canonical.messages.CopyFrom(request.messages)
    elif request.WhichOneof("input") == "prompt_token_ids":
        canonical.prompt_token_ids.CopyFrom(request.prompt_token_ids)
    else:
        canonical.prompt = request.prompt
    body = json_format.MessageToJson(canonical, sort_keys=True, indent=None)
    return hashlib.sha256(json.dumps([tenant, body]).encode()).hexdigest()


def encode(entry: CachedResponse) -> bytes:
    return json.dumps(
        [list(entry.chunks), entry.finish_reason, entry.prompt_tokens, entry.completion_tokens]
    ).encode()


def decode(raw: bytes) -> CachedResponse:
    chunks, reason, prompt, completion = json.loads(raw)
    return CachedResponse(tuple(chunks), reason, prompt, completion)


class PromptCache(abc.ABC):
    ttl_s: float
    max_entries: int
    redis: object | None = None  # the Redis client it stores through, if any

    @property
    def enabled(self) -> bool:
        """A cache with no lifetime or no room keeps nothing: callers skip it (no lookups
        counted, no round trips)."""
        return self.ttl_s > 0 and self.max_entries > 0

    @abc.abstractmethod
    async def get(self, key: str) -> CachedResponse | None:
        """The entry, counted as a hit, or None, counted as a miss."""

    @abc.abstractmethod
    async def put(self, key: str, value: CachedResponse) -> None: ...

    @abc.abstractmethod
    async def hits(self) -> int: ...

    @abc.abstractmethod
    async def misses(self) -> int: ...

    @abc.abstractmethod
    async def size(self) -> int: ...


class InMemoryPromptCache(PromptCache):
    def __init__(self, ttl_s: float, max_entries: int, clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._hits = 0
        self._misses = 0

    async def get(self, key: str) -> CachedResponse | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= self._clock():
            if entry is not None:
                del self._entries[key]
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[1]

    async def hits(self) -> int:
        return self._hits

    async def misses(self) -> int:
        return self._misses

    async def put(self, key: str, value: CachedResponse) -> None:
        if not self.enabled:
            return
        self._entries[key] = (self._clock() + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def size(self) -> int:
        return len(self._entries)
