"""Circuit breakers a caller keeps per peer: the coordinator one per worker, the gateway
one per coordinator.

After ``threshold`` failures in a row a peer's circuit opens for ``cooldown_s``; then
calls go through again (half-open): a success closes the circuit, a failure opens it
for another cooldown at once.

A small class of our own rather than a library: both callers ask "which peers are open
right now?" (the coordinator routes around them and reports them in its status; the
gateway tries them last) and report outcomes that are not an exception escaping one
block (the gateway counts transport failures only; the coordinator's stream spans a
whole generation).  The asyncio breaker libraries (purgatory, aiobreaker) wrap one call
at a time and keep that state private.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None


class CircuitBreakers:
    def __init__(
        self, threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def is_open(self, peer: str) -> bool:
        circuit = self._circuits.get(peer)
        return (
            circuit is not None
            and circuit.opened_at is not None
            and self.clock() < circuit.opened_at + self.cooldown_s
        )

    def open_peers(self) -> set[str]:
        return {peer for peer in self._circuits if self.is_open(peer)}

    def succeeded(self, peer: str) -> None:
        self._circuits.pop(peer, None)

    def failed(self, peer: str) -> None:
        circuit = self._circuits.setdefault(peer, _Circuit())
        circuit.failures += 1
        if circuit.failures >= self.threshold:
            circuit.opened_at = self.clock()
