"""Per-caller limits: requests per minute, tokens per minute and generations at once
(for generations), and requests per minute for everything else (files, training,
admin).

The counters live in the ``limits`` library's storage: Redis when ``redis_url`` is set
(its moving-window Lua scripts are atomic, so several gateways enforce one limit
together rather than one each), memory otherwise.  Over a limit: 429 with
``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers.

Tokens are *reserved* at admission — an estimate of the prompt (``len(text) / 3``)
plus ``max_tokens`` — and settled when the generation ends: the reservation is
released and the tokens really used are counted in the window.  A request is admitted
only if what the window has counted plus what is reserved in flight plus its own
reservation fits the limit, so concurrent requests cannot together overrun it.  Under
a token limit a request without ``max_tokens`` is given ``tpm_default_reserve`` (at
most the limit), so what it reserves bounds what it can use; one whose reservation
alone is over the limit is a 400 naming ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from fastapi import Request
from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from cyllm import errors
from cyllm.gateway.auth import Identity, authenticate
from cyllm.gateway.budgets import Budgets, Hold, Seed
from cyllm.gateway.counters import Counters
from cyllm.gateway.settings import GatewaySettings


@dataclass
class Admission:
    """What one admitted request holds (entries in ``counters.py``), let go when it ends."""

    subject: str
    headers: dict[str, str] = field(default_factory=dict)
    slot: str = ""
    reserved: str = ""
    budget: Hold | None = None


class RateLimiter:
    def __init__(self, settings: GatewaySettings, seed: Seed) -> None:
        """``seed``: the usage ledger's spending of a caller since a time (``budgets.py``)."""
        self.rpm = RateLimitItemPerMinute(settings.rate_limit_rpm) if settings.rate_limit_rpm else None
        self.tpm = RateLimitItemPerMinute(settings.rate_limit_tpm) if settings.rate_limit_tpm else None
        self.control_rpm = (
            RateLimitItemPerMinute(settings.rate_limit_control_rpm)
            if settings.rate_limit_control_rpm
            else None
        )
        self.default_reserve = settings.tpm_default_reserve
        self.concurrency = settings.rate_limit_concurrency
        storage: RedisStorage | MemoryStorage
        if settings.redis_url:
            storage = RedisStorage(
                "async+" + settings.redis_url, implementation="redispy", key_prefix="cyllm:limits"
            )
        else:
            storage = MemoryStorage()
        self.window = MovingWindowRateLimiter(storage)
        self.counters = Counters(settings.redis_url)
        self._ending: set[asyncio.Task[None]] = set()
        self.budgets = Budgets(self.counters, seed)

    @property
    def active(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency)

    def bound(self, max_tokens: int | None, caller: Identity) -> int | None:
        """The ``max_tokens`` a request runs with: its own, or the default under a token
        limit or a budget (what it reserves bounds what it can use)."""
        if max_tokens is not None or (self.tpm is None and caller.budget is None):
            return max_tokens
        return min(self.default_reserve, self.tpm.amount) if self.tpm else self.default_reserve

    def reservation(self, prompt_chars: int, max_tokens: int | None) -> int:
        prompt = prompt_chars // 3 + 1
        reserve = prompt + (max_tokens or 0)
        if self.tpm is not None and reserve > self.tpm.amount:
            raise errors.InvalidRequest(
                f"the prompt (about {prompt} tokens) plus max_tokens ({max_tokens}) "
                f"is over this caller's limit of {self.tpm.amount} tokens per minute",
                param="max_tokens",
            )
        return reserve

    async def admit(self, identity: Identity, reserve: int = 0) -> Admission:
        adm = Admission(identity.subject)
        if not self.active and identity.budget is None:
            return adm
        try:
            if self.rpm is not None:
                await self._hit(self.rpm, "rpm", adm, "requests per minute")
            if self.tpm is not None:
                await self._reserve(adm, reserve)
            if self.concurrency is not None:
                adm.slot = self.counters.new_id()  # before holding: let go of whatever happens
                running, _ = await self.counters.hold(_key("running", adm.subject), adm.slot, 1)
                if running > self.concurrency:
                    raise errors.RateLimited(
                        f"more than {self.concurrency} generations at once for this caller",
                        retry_after=1,
                        headers=adm.headers,
                    )
            if identity.budget is not None:
                adm.budget = Hold(identity.subject, {})
                await self.budgets.reserve(adm.budget, identity.budget, reserve, adm.headers)
        except BaseException:
            await self.finish(adm, 0)
            raise
        return adm

    async def _reserve(self, adm: Admission, reserve: int) -> None:
        assert self.tpm is not None
        # Reserve, then read the window; ``finish`` counts, then releases.  A request
        # ending meanwhile is then seen as reserved or as counted, never as neither.
        adm.reserved = self.counters.new_id()
        in_flight = (await self.counters.hold(_key("reserved", adm.subject), adm.reserved, reserve))[0]
        stats = await self.window.get_window_stats(self.tpm, "tpm", adm.subject)
        spent = self.tpm.amount - stats.remaining
        left = self.tpm.amount - spent - in_flight
        adm.headers |= _headers("tokens", self.tpm.amount, left, stats.reset_time)
        if left < 0:
            raise self._refuse(
                "tokens per minute (counting the tokens reserved by requests still running)",
                stats.reset_time,
                adm.headers,
            )

    async def finish(self, adm: Admission, tokens: int) -> None:
        """Free the slot and the reservations; count the tokens really used — all of it,
        whatever happens to the request meanwhile (a client gone mid-stream cancels it):
        a hold left would keep the caller's slot or tokens.  Without Redis nothing in it
        waits, so nothing can cut it short: no task of its own (it cost a request 25 µs)."""
        if self.counters.redis is None:
            await self._end(adm, tokens)
            return
        ending = asyncio.ensure_future(self._end(adm, tokens))
        self._ending.add(ending)
        ending.add_done_callback(self._ending.discard)
        await asyncio.shield(ending)

    async def _end(self, adm: Admission, tokens: int) -> None:
        slot, reserved, budget = adm.slot, adm.reserved, adm.budget  # taken: ended once
        adm.slot, adm.reserved, adm.budget = "", "", None
        try:
            if self.tpm is not None and tokens > 0 and reserved:
                stats = await self.window.get_window_stats(self.tpm, "tpm", adm.subject)
                if stats.remaining > 0:
                    await self.window.hit(self.tpm, "tpm", adm.subject, cost=min(tokens, stats.remaining))
        finally:  # one after another: each is shielded and never fails (counters.py)
            if slot:
                await self.counters.let_go(_key("running", adm.subject), slot)
            if reserved:
                await self.counters.let_go(_key("reserved", adm.subject), reserved)
            if budget is not None:
                await self.budgets.release(budget, tokens)

    async def control(self, identity: Identity) -> None:
        """A request to a route that is not a generation (files, training, admin)."""
        if self.control_rpm is not None:
            await self._hit(
                self.control_rpm,
                "control",
                Admission(identity.subject),
                "requests per minute to files, training and admin routes",
            )

    async def _hit(self, item: RateLimitItemPerMinute, name: str, adm: Admission, what: str) -> None:
        """Count one request against ``item``; 429 when it is over."""
        allowed = await self.window.hit(item, name, adm.subject)
        stats = await self.window.get_window_stats(item, name, adm.subject)
        adm.headers |= _headers("requests", item.amount, stats.remaining, stats.reset_time)
        if not allowed:
            raise self._refuse(what, stats.reset_time, adm.headers)

    def _refuse(self, what: str, reset: float, headers: dict[str, str]) -> errors.RateLimited:
        wait = max(1.0, reset - time.time())
        return errors.RateLimited(
            f"rate limit exceeded: {what}; retry in {math.ceil(wait)}s", retry_after=wait, headers=headers
        )

    async def close(self) -> None:
        if self._ending:
            await asyncio.wait(list(self._ending), timeout=10)
        await self.counters.close()


def _key(counter: str, subject: str) -> str:
    return f"cyllm:limits:{counter}:{subject}"


def _headers(kind: str, limit: int, remaining: int, reset: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": f"{max(0.0, reset - time.time()):.0f}s",
    }


async def limit_control(request: Request) -> None:
    """FastAPI dependency of the file, training and admin routes."""
    await request.app.state.limiter.control(await authenticate(request))


async def check_training_budget(request: Request) -> float:
    """A new training job: 429 while the caller's month of device-seconds is spent.  The
    budget (0: none), for the job to carry: the coordinator stops it once it is spent."""
    caller = await authenticate(request)
    if caller.budget is None:
        return 0.0
    await request.app.state.limiter.budgets.check_training(caller.subject, caller.budget)
    return caller.budget.device_seconds_per_month or 0.0
