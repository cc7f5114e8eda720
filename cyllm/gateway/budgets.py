"""Budgets: how many tokens a caller may use in a UTC day and month, and how many
training device-seconds in a month.

A budget belongs to a subject — an API key (``cyllm keys create --budget``, or the
console) or, for a JWT's subject or the anonymous caller, ``gateway.budgets`` — and is
checked at admission with the reservation the TPM limit uses (the prompt's estimate plus
``max_tokens``; a request without ``max_tokens`` is given ``tpm_default_reserve``): a
request is admitted only if what the period has spent, plus what requests still running
have reserved, plus its own reservation fits.  Concurrent requests on every gateway
therefore cannot together overrun it: the counters are in Redis when ``redis_url`` is
set (one for all gateways; the check and the settlement each one step, see
``counters.py``), in this process otherwise (one gateway).  A period's counter that does not exist yet (a new
day, a restarted gateway, a Redis that was emptied) starts from the usage ledger's sum
for the period, so a restart forgets nothing but the few seconds of usage not yet
reported.

Over ``warn_at`` of a budget a response carries ``x-cyllm-budget-warning`` and the
gateway logs a ``budget warning`` event (once per subject and period per process);
over the budget the request is a 429 ``insufficient_quota`` that says when the period
resets (``Retry-After``).  A training job is refused at creation while the month's
device-seconds are spent.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from cyllm import errors
from cyllm.coordinator.ledger import period_bounds
from cyllm.gateway.counters import Counters

log = logging.getLogger("cyllm.gateway.budgets")
PERIODS = ("day", "month")


class Budget(BaseModel):
    """What one subject may spend; a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid")

    tokens_per_day: int | None = Field(None, ge=1, description="prompt + completion tokens per UTC day")
    tokens_per_month: int | None = Field(None, ge=1, description="prompt + completion tokens per UTC month")
    device_seconds_per_month: float | None = Field(
        None, gt=0, description="training device-seconds (wall time x processes) per UTC month"
    )
    warn_at: float = Field(0.8, gt=0, le=1, description="the share of a budget past which responses warn")

    def tokens(self, period: str) -> int | None:
        return self.tokens_per_day if period == "day" else self.tokens_per_month


class QuotaExceeded(errors.RateLimited):
    code = "insufficient_quota"


Seed = Callable[[str, int], Awaitable[tuple[int, float]]]


@dataclass
class Hold:
    """One admitted request's reservations, released when it ends."""

    subject: str
    reserved: dict[str, tuple[int, str]]  # period -> (its start, its entry in the counters)


class Budgets:
    """``seed(subject, since)``: the ledger's (tokens, device-seconds) since a period's
    start, for a counter that does not exist yet."""

    def __init__(self, counters: Counters, seed: Seed, clock: Callable[[], float] = time.time) -> None:
        self._counters = counters
        self._seed = seed
        self._clock = clock
        self._warned: set[tuple[str, str, int]] = set()

    async def reserve(self, hold: Hold, budget: Budget, reserve: int, headers: dict[str, str]) -> None:
        """Reserve ``reserve`` tokens in each period the budget limits, in ``hold`` (let
        go of by ``release``, even when this raises), or raise 429."""
        subject = hold.subject
        now = self._clock()
        try:
            for period in PERIODS:
                limit = budget.tokens(period)
                if limit is None:
                    continue
                start, end = period_bounds(period, now)
                spent, in_flight = await self._reserve(hold, period, start, end, reserve)
                used = spent + in_flight
                if used > limit:
                    raise QuotaExceeded(
                        f"budget exceeded: this caller's {limit} tokens per {period} are spent or "
                        f"reserved by requests still running; it resets at {_iso(end)}",
                        retry_after=max(1.0, end - now),
                        headers=headers | {"x-cyllm-budget-reset": _iso(end)},
                    )
                self._warn(subject, period, start, end, used, limit, budget.warn_at, headers)
        except BaseException:
            await self.release(hold, 0)
            raise

    async def release(self, hold: Hold, tokens: int) -> None:
        """The request ended having used ``tokens``: its reservations become spending,
        whatever happens to the request meanwhile (``counters.py``)."""
        reserved, hold.reserved = hold.reserved, {}
        for period, (start, entry) in reserved.items():
            await self._counters.let_go(
                self._key(hold.subject, period, start, "reserved"),
                entry,
                (self._key(hold.subject, period, start, "spent"), tokens, _expiry(period, start)),
            )

    async def check_training(self, subject: str, budget: Budget) -> None:
        """Refuse a new training job while the month's device-seconds are spent."""
        if budget.device_seconds_per_month is None:
            return
        now = self._clock()
        start, end = period_bounds("month", now)
        used = (await self._seed(subject, start))[1]
        if used >= budget.device_seconds_per_month:
            raise QuotaExceeded(
                f"budget exceeded: this caller's {budget.device_seconds_per_month:g} training "
                f"device-seconds per month are spent ({used:.0f}); it resets at {_iso(end)}",
                retry_after=max(1.0, end - now),
                headers={"x-cyllm-budget-reset": _iso(end)},
            )

    def _warn(
        self,
        subject: str,
        period: str,
        start: int,
        end: int,
        used: int,
        limit: int,
        warn_at: float,
        headers: dict[str, str],
    ) -> None:
        if used < warn_at * limit:
            return
        headers["x-cyllm-budget-warning"] = (
            f"{min(100, math.floor(100 * used / limit))}% of {limit} tokens per {period} used; "
            f"resets at {_iso(end)}"
        )
        if (subject, period, start) not in self._warned:
            self._warned.add((subject, period, start))
            log.warning(
                "budget warning: %s has used %d of its %d tokens per %s",
                subject,
                used,
                limit,
                period,
                extra={"event": "budget_warning", "caller": subject, "period": period},
            )

    @staticmethod
    def _key(subject: str, period: str, start: int, what: str) -> str:
        return f"cyllm:budget:{what}:{period}:{start}:{subject}"

    async def _reserve(self, hold: Hold, period: str, start: int, end: int, amount: int) -> tuple[int, int]:
        """Hold ``amount`` more in the period: (spent, held) as they were together, the
        hold included (``counters.py``: a request settling meanwhile is in one of them).
        A period's spending that is not counted yet starts from the ledger's sum."""
        held_key, spent_key = (self._key(hold.subject, period, start, w) for w in ("reserved", "spent"))
        spent = (spent_key, 0, _expiry(period, start))
        entry = self._counters.new_id()
        hold.reserved[period] = (start, entry)  # before holding: let go of whatever happens
        held, spending = await self._counters.hold(held_key, entry, amount, spent)
        if spending is None:
            seeded = (await self._seed(hold.subject, start))[0]
            # another request may have seeded it, and spent since, while this one waited
            await self._counters.set_if_missing(spent_key, seeded, _expiry(period, start))
            self._forget_before(period_bounds("month", start)[0])
            held, spending = await self._counters.read(held_key, spent)
        return seeded if spending is None else spending, held

    def _forget_before(self, oldest: int) -> None:
        """Periods before last month's go (without Redis, memory stays bounded by the
        callers of two periods; Redis expires its own)."""
        self._counters.forget(lambda key: key.startswith("cyllm:budget:") and int(key.split(":")[4]) < oldest)
        self._warned = {w for w in self._warned if w[2] >= oldest}


def _expiry(period: str, start: int) -> int:
    """A spending counter's: the period's end, and a day."""
    return period_bounds(period, start)[1] + 86400


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
