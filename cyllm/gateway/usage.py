"""What a request used: one record (:class:`Usage`) that the access log writes and the
usage ledger adds up (:class:`UsageRecorder`), and the usage object each surface answers
with (:class:`TokenUsage`, OpenAI's shape; the native API's is the same in camelCase)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

from pydantic import BaseModel

from cyllm import errors
from cyllm.coordinator.ledger import add_sums, hour_of
from cyllm.protocol import pb

log = logging.getLogger("cyllm.gateway.usage")


@dataclass
class Usage:
    """The tokens of one request, over all its choices: the prompt counted once, as
    OpenAI counts it; each choice's completion added as it finishes."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # completion tokens the prompt cache answered

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, prompt_tokens: int, completion_tokens: int, cached: bool = False) -> None:
        self.prompt_tokens = max(self.prompt_tokens, prompt_tokens)
        self.completion_tokens += completion_tokens
        if cached:
            self.cached_tokens += completion_tokens


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> Self:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )


class UsageRecorder:
    """Adds up this gateway's requests by hour, caller, model, route and outcome, and
    reports the sums to the coordinators' ledger every ``every_s`` seconds: a request
    only adds to a dict (no I/O, no await on its path).  What a report could not deliver
    (no coordinator reachable) is kept for the next, up to ``max_rows`` groups; past
    that new groups are dropped and counted in the log.  ``stop()`` reports what is left."""

    def __init__(
        self,
        report: Callable[[list[pb.UsageRow]], Awaitable[None]],
        every_s: float = 2.0,
        max_rows: int = 10_000,  # what one report may carry (services/usage.py)
    ) -> None:
        self._report = report
        self.every_s = every_s
        self.max_rows = max_rows
        self._rows: dict[tuple, pb.UsageRow] = {}
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None

    def record(self, when: float, subject: str, route: str, status: int, usage: Usage) -> None:
        outcome = "ok" if status < 400 else "error"
        # A refused request keeps no model name: the name is the caller's own (a model
        # that does not exist), and each would be a row of its own.
        model = usage.model if outcome == "ok" or usage.total_tokens else ""
        key = (hour_of(when), subject, model, route, outcome)
        row = self._rows.get(key)
        if row is None:
            if len(self._rows) >= self.max_rows:
                self.dropped += 1
                return
            row = self._rows[key] = pb.UsageRow(
                start=key[0], subject=subject, model=model, route=route, outcome=outcome
            )
        row.requests += 1
        row.prompt_tokens += usage.prompt_tokens
        row.completion_tokens += usage.completion_tokens
        row.cached_tokens += usage.cached_tokens

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.flush()
            except Exception:  # a report never stops the next
                log.exception("usage report failed")

    async def flush(self) -> None:
        if not self._rows:
            return
        rows, self._rows = self._rows, {}
        try:
            await self._report(list(rows.values()))
        except errors.CyllmError as exc:
            log.warning("usage not reported yet (%s): kept for the next report", exc)
            for key, row in rows.items():  # back, under what arrived meanwhile
                if key in self._rows:
                    add_sums(self._rows[key], row)
                elif len(self._rows) < self.max_rows:
                    self._rows[key] = row
                else:
                    self.dropped += row.requests
        if self.dropped:
            log.error("usage ledger: %d requests' usage dropped (no coordinator reachable)", self.dropped)
            self.dropped = 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
