"""Where failover happens: a call tried on one peer after another until one answers.

Every caller that has more than one peer for a call goes through here — the gateway
over its coordinators (generations, training watches, unary calls), the coordinator
over its workers (generations, embeddings), a hybrid engine over its members — and
states only what differs:

* the **peers** (:class:`Peers`): who is next, given those that failed this call — a
  fixed list in turn (:class:`InTurn`, open circuits last), or a worker slot taken
  from the scheduler's queue (the coordinator's, given back after each attempt);
* the **rule** (:class:`Rule`): which errors move the call on, which of them count
  against the peer in its circuit breaker, how many attempts and what pause between;
* the **progress** of a stream (:class:`Progress`): what went to the caller, whether
  the call may still move on, and what the next peer is asked.  A generation's is
  its :class:`~cyllm.protocol.relay.Relay` (the next peer continues from the tokens
  sent); without one, a stream moves on only while it has sent nothing.

Not tenacity: it retries one block against one target, while each attempt here picks
another peer, reads and updates that peer's circuit, and a stream continues from what
was relayed rather than starting again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from cyllm import errors
from cyllm.protocol.breaker import CircuitBreakers

log = logging.getLogger(__name__)

P = TypeVar("P", bound="Peer")
T = TypeVar("T")
Q = TypeVar("Q", contravariant=True)


class Peer(Protocol):
    @property
    def name(self) -> str:
        """What its circuit breaker and the logs know it by."""


class Peers(Protocol[P]):
    async def take(self, failed: frozenset[str]) -> P | None:
        """The next peer for a call that ``failed`` on these (by name); None: none left."""

    async def give_back(self, peer: P) -> None:
        """The attempt on ``peer`` is over (a slot it held is freed)."""


@dataclass(frozen=True)
class Rule:
    """``moves_on``: errors after which the call goes to the next peer; ``blames``: the
    errors that count against the peer's circuit (any other end, an answer included,
    closes it); ``attempts``: at most this many peers (None: until the peers run out);
    ``pauses``: seconds to wait before attempt 2, 3, ... (the last one repeats)."""

    moves_on: tuple[type[BaseException], ...]
    blames: Callable[[BaseException], bool]
    attempts: int | None = None
    pauses: tuple[float, ...] = ()
    what: str = "peer"  # in the logs: "coordinator", "worker", ...


class Progress(Protocol[Q]):
    def pass_on(self, item: Q) -> bool:
        """Record ``item``; False when it must not reach the caller (a repeat)."""

    @property
    def resumable(self) -> bool:
        """Whether another peer can still take the call over."""

    @property
    def resuming(self) -> bool:
        """Whether something already went to the caller (a next peer continues)."""


class Fresh:
    """The progress of a stream that cannot be continued elsewhere: it may move on only
    while nothing went to the caller."""

    def __init__(self) -> None:
        self.sent = False

    def pass_on(self, item: object) -> bool:
        self.sent = True
        return True

    @property
    def resumable(self) -> bool:
        return not self.sent

    @property
    def resuming(self) -> bool:
        return self.sent


Moved = Callable[[Peer, errors.CyllmError, bool], None]  # (peer, why, resuming)


def stream(
    peers: Peers[P],
    call: Callable[[P], AsyncGenerator[T, None]],
    rule: Rule,
    *,
    breakers: CircuitBreakers | None = None,
    progress: Progress[T] | None = None,
    moved: Moved | None = None,
    request_id: str = "",
) -> AsyncGenerator[T, None]:
    """``call(peer)``'s items, moving to the next peer as ``rule`` says; closing this
    closes the peer's stream (cancelling its call).  ``moved`` hears of each move."""
    return _Attempts(peers, rule, breakers, moved, request_id).stream(call, progress or Fresh())


async def unary(
    peers: Peers[P],
    call: Callable[[P], Awaitable[T]],
    rule: Rule,
    *,
    breakers: CircuitBreakers | None = None,
    moved: Moved | None = None,
    request_id: str = "",
) -> T:
    """``call(peer)``'s answer from the first peer that gives one, as ``rule`` says."""

    async def one(peer: P) -> AsyncGenerator[T, None]:
        yield await call(peer)

    attempts = _Attempts(peers, rule, breakers, moved, request_id)
    fresh: Progress[T] = Fresh()
    async with aclosing(attempts.stream(one, fresh)) as answers:
        async for answer in answers:
            return answer
    raise errors.EngineError("a call ended without an answer")


@dataclass
class _Attempts(Generic[P]):
    peers: Peers[P]
    rule: Rule
    breakers: CircuitBreakers | None
    moved: Moved | None
    request_id: str

    async def stream(
        self, call: Callable[[P], AsyncGenerator[T, None]], progress: Progress[T]
    ) -> AsyncGenerator[T, None]:
        failed: set[str] = set()
        last: errors.CyllmError | None = None
        for attempt in itertools.count(1):
            peer = await self.peers.take(frozenset(failed))
            if peer is None:
                raise last or errors.Unavailable(f"no {self.rule.what} to call")
            try:
                async with aclosing(call(peer)) as items:
                    async for item in items:
                        if progress.pass_on(item):
                            yield item
                self._outcome(peer, None)
                return
            except BaseException as exc:
                self._outcome(peer, exc)
                if (
                    not isinstance(exc, self.rule.moves_on)
                    or not progress.resumable
                    or attempt == self.rule.attempts
                ):
                    raise
                assert isinstance(exc, errors.CyllmError), "only the project's errors move on"
                failed.add(peer.name)
                last = exc
                self._moving(peer, exc, progress.resuming)
            finally:
                await self.peers.give_back(peer)
            if self.rule.pauses:
                await asyncio.sleep(self.rule.pauses[min(attempt, len(self.rule.pauses)) - 1])
        raise AssertionError("unreachable")  # itertools.count never ends

    def _outcome(self, peer: P, exc: BaseException | None) -> None:
        if self.breakers is None:
            return
        if exc is not None and self.rule.blames(exc):
            self.breakers.failed(peer.name)
        else:
            self.breakers.succeeded(peer.name)

    def _moving(self, peer: P, err: errors.CyllmError, resuming: bool) -> None:
        if self.moved is not None:
            self.moved(peer, err, resuming)
        log.warning(
            "%s %s failed (%s); %s",
            self.rule.what,
            peer.name,
            err.message,
            "continuing on the next" if resuming else "trying the next",
            extra={"request_id": self.request_id},
        )


@dataclass(frozen=True)
class Named(Generic[T]):
    """A peer of a fixed list: its name and what is called on it."""

    name: str
    target: T


@dataclass
class InTurn(Generic[T]):
    """A fixed list, ``rounds`` times over (a restarted peer may be back), starting where
    ``start`` says (callers spread over the list); peers whose circuit is open come
    last, tried only when all others failed."""

    peers: Sequence[Named[T]]
    breakers: CircuitBreakers | None = None
    start: int = 0
    rounds: int = 1
    order: list[Named[T]] = field(init=False)  # the attempts to come, in order
    _tried: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        n = len(self.peers)
        turned = [self.peers[(self.start + i) % n] for i in range(n)] if n else []
        if self.breakers is not None:
            closed = [p for p in turned if not self.breakers.is_open(p.name)]
            turned = closed + [p for p in turned if p not in closed]
        self.order = turned * self.rounds

    async def take(self, failed: frozenset[str]) -> Named[T] | None:
        if self._tried >= len(self.order):
            return None
        self._tried += 1
        return self.order[self._tried - 1]

    async def give_back(self, peer: Named[T]) -> None:
        return None
