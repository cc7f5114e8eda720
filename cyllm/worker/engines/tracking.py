"""Bookkeeping shared by the adapters over external libraries: what is running, how many
tokens came out and when the last one did (the progress signal the coordinator's health
check reads), and a text/token accumulator for libraries that stream text deltas."""

from __future__ import annotations

import time

from cyllm.worker.engines.base import EngineHealth, TextDelta


class RequestTracker:
    def __init__(self) -> None:
        self.running: set[str] = set()
        self.waiting = 0
        self.tokens_generated = 0
        self.last_token_at = time.monotonic()

    def start(self, request_id: str) -> None:
        self.running.add(request_id)

    def produced(self, tokens: int) -> None:
        if tokens:
            self.tokens_generated += tokens
            self.last_token_at = time.monotonic()

    def finish(self, request_id: str) -> None:
        self.running.discard(request_id)

    def health(self, healthy: bool = True, detail: str = "") -> EngineHealth:
        return EngineHealth(healthy, len(self.running), self.waiting, self.tokens_generated,
                            self.last_token_at, detail)


class DeltaBuffer:
    """Libraries hold text back (stop-string matching, partial UTF-8) while tokens keep
    coming: carry the token count until there is text to send with it."""

    def __init__(self) -> None:
        self.tokens = 0
        self.total = 0

    def push(self, text: str, tokens: int) -> TextDelta | None:
        self.tokens += tokens
        self.total += tokens
        if not text:
            return None
        delta, self.tokens = TextDelta(text, self.tokens), 0
        return delta
