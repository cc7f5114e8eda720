"""One generation as the gateway runs it, whatever surface asked for it.

:class:`Generation` checks the caller's model rights and limits, sends the request
(``request.GenerationRequest``, written as the wire message there) to a coordinator and
reads the first event before any response is sent, so a refused request still gets a
proper 4xx/5xx status instead of a broken stream.  After that, ``events()`` is the one
stream every surface formats: text pieces, then ``Done`` or ``Failed``.  A request's
``n`` choices are ``n`` generations (``choices.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import HTTPConnection, Request

from cyllm import errors, tracing
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import BATCH_CALLER, TRACE, context
from cyllm.gateway.ratelimit import Admission
from cyllm.gateway.request import GenerationRequest
from cyllm.gateway.usage import Usage
from cyllm.protocol import pb
from cyllm.protocol.coalesce import coalesced

PRIORITY_SCOPE = "priority"
BATCH_PRIORITY = -101  # a batch's requests: below the lowest a caller may ask (batch_runner.py)


async def _hung_up(request: Request) -> None:
    """Returns once the client has disconnected.  The body has been read, so the next
    ASGI message is the disconnect, as Starlette's streaming responses wait for it (no
    polling: ``is_disconnected`` costs a cancel scope per look)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


IDEMPOTENCY_HEADER = "Idempotency-Key"


def idempotency_key(conn: HTTPConnection) -> str:
    """The request's Idempotency-Key ('' when none): 1 to 255 visible ASCII characters."""
    key = conn.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return ""
    if not 0 < len(key) <= 255 or not all("!" <= c <= "~" for c in key):
        raise errors.InvalidRequest(
            f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII characters", param=IDEMPOTENCY_HEADER
        )
    return key


@dataclass
class Outcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


@dataclass(frozen=True)
class Text:
    text: str
    logprobs: tuple[pb.TokenLogprob, ...] = ()  # where asked: its tokens'


@dataclass(frozen=True)
class Done:
    outcome: Outcome


@dataclass(frozen=True)
class Failed:
    """An error after the response started: the surface sends it as its error frame."""

    error: errors.CyllmError


Event = Text | Done | Failed


class Generation:
    """One running generation: ``await start()``, then ``events()`` (streams) or
    ``text()`` (whole answers).

    ``start`` checks the caller's model rights and rate limits before anything is sent
    upstream; the limits are settled (slot freed, tokens counted) when the stream ends.
    """

    def __init__(
        self, conn: HTTPConnection, request: GenerationRequest, *, whole: bool = False, choice: int = 0
    ) -> None:
        """``whole``: the answer is sent in one piece (not streamed); such a request may
        carry an ``Idempotency-Key`` (a stream cannot be replayed to a retry, so the
        header is ignored there).  ``choice``: which of a request's ``n`` answers this
        is (each has its own id upstream, and its own share of the key)."""
        key = idempotency_key(conn) if whole else ""
        state = conn.app.state
        self.ctx = context(conn)
        self.choice = choice
        self._rid = self.ctx.request_id if not choice else f"{self.ctx.request_id}-{choice}"
        self._conn = conn
        self._client, self.request = coordinator(conn), request
        self._events: AsyncGenerator[pb.GenerateResponse, None] | None = None
        self.limiter = state.limiter
        self.metrics = state.metrics
        self._admission: Admission | None = None
        self.outcome = Outcome()
        self.logprobs: list[pb.TokenLogprob] = []  # a whole answer's, where asked
        self.prompt_logprobs: list[pb.TokenLogprob] = []  # the prompt's, where asked (first: none)
        self.model = request.model
        self.label = "(unknown)"  # the model as metrics may name it: the coordinator says
        self._wire = request.to_proto(self.ctx.request_id, choice)
        self._wire.idempotency_key = f"{key}#{choice}" if key and choice else key
        if BATCH_CALLER in conn.scope:
            self._wire.priority = BATCH_PRIORITY
        self._started = time.perf_counter()
        self._keep_text: list[str] | None = [] if state.settings.log_content else None
        self._streamed = 0  # completion tokens relayed: what a stream cut short has used
        self._counted = False  # its usage added to the request's (at the end, or when cut short)
        # A whole answer is collected as it comes, never lagging: nothing to merge.
        self._merge = not whole and self._client.unmerged

    async def start(self) -> Generation:
        caller = self.ctx.caller
        caller.check_model(self.model)
        if self.request.priority > 0 and not (caller.admin or PRIORITY_SCOPE in caller.scopes):
            raise errors.Forbidden(f"priority above 0 needs the {PRIORITY_SCOPE!r} scope", param="priority")
        sampling = self._wire.sampling
        bound = self.limiter.bound(sampling.max_tokens if sampling.HasField("max_tokens") else None, caller)
        if bound is not None:
            sampling.max_tokens = bound
        reserve = self.limiter.reservation(self.request.prompt_chars(), bound)
        trace = self._conn.scope.get(TRACE)  # the request's span, when tracing is on
        with tracing.child(trace, "admission", **{"cyllm.reserved_tokens": reserve}):
            self._admission = await self.limiter.admit(caller, reserve)
        self._wire.traceparent = tracing.traceparent(trace)
        self.ctx.ratelimit_headers = self._admission.headers
        if self.ctx.usage is None:
            self.ctx.usage = Usage(self.model)
        self._events = self._client.generate(self._wire, self._rid)
        try:
            first = await anext(self._events)
        except StopAsyncIteration:
            await self._settle()
            raise errors.EngineError("the generation ended before it started") from None
        except BaseException:
            await self._events.aclose()
            await self._settle()
            raise
        self.outcome.prompt_tokens = first.started.prompt_tokens
        self.outcome.cached = first.started.cached
        self.label = first.started.model_label or self.label
        self.prompt_logprobs = list(first.started.prompt_logprobs)
        return self

    async def close(self) -> None:
        """Give up a started generation that will not be read (cancelled upstream)."""
        if self._events is not None:
            await self._events.aclose()
        await self._settle()

    async def events(self) -> AsyncIterator[Event]:
        """Text pieces, then Done or Failed; closing this early cancels upstream."""
        try:
            async for piece in self._pieces():
                yield piece
        except errors.CyllmError as exc:
            self.ctx.failed = True  # after a 200 was sent: still a failure in the ledger
            yield Failed(exc)
            return
        yield Done(self.outcome)

    async def text(self) -> str:
        """The whole answer (an error raises: nothing was sent yet).  A caller that hangs
        up meanwhile cancels it down to the engine: nobody is left to read the answer.
        It is collected in this task (a task of its own and a wait for either cost a
        short request about 0.04 ms); a watcher cancels it on a hang-up, and that
        cancellation is told from any other by who asked for it."""
        request = self._conn
        if not isinstance(request, Request):
            return await self._collect()
        me = asyncio.current_task()
        assert me is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            await _hung_up(request)
            gone = True
            me.cancel()  # this task waits in _collect: the only place it can be woken

        watcher = asyncio.ensure_future(watch())
        try:
            text = await self._collect()
        except asyncio.CancelledError:
            if gone and me.uncancel() == 0:
                raise errors.RequestCancelled("the client disconnected") from None
            raise
        finally:
            watcher.cancel()
        if gone:  # something below took the cancellation: the request is not cancelled
            me.uncancel()
        return text

    async def _collect(self) -> str:
        pieces = []
        async for piece in self._pieces():
            pieces.append(piece.text)
            self.logprobs.extend(piece.logprobs)
        return "".join(pieces)

    async def _pieces(self) -> AsyncIterator[Text]:
        assert self._events is not None, "start() first"
        last = None
        try:
            # Deltas that arrive while the client's connection lags merge into one piece.
            stream = coalesced(self._events) if self._merge else self._events
            async with aclosing(stream) as events:
                async for msg in events:
                    kind = msg.WhichOneof("event")
                    if kind == "delta" and not msg.delta.text and msg.delta.logprobs:
                        yield Text("", tuple(msg.delta.logprobs))  # tokens whose text is held back
                    elif kind == "delta" and msg.delta.text:
                        # A merged delta carries k tokens: the gap since the last one
                        # is shared among them, so the histogram counts tokens.
                        now, k = time.perf_counter(), max(1, len(msg.delta.token_ids))
                        self._streamed += k
                        if last is None:
                            self.metrics.ttft.labels(self.label).observe(now - self._started)
                            self.metrics.traffic.first_token(now - self._started)
                            gaps, gap = k - 1, 0.0
                        else:
                            gaps, gap = k, (now - last) / k
                        if gaps:
                            self.metrics.itl.observe(self.label, gap, gaps)
                        last = now
                        if self._keep_text is not None:
                            self._keep_text.append(msg.delta.text)
                        yield Text(msg.delta.text, tuple(msg.delta.logprobs))
                    elif kind == "finished":
                        self._finished(msg.finished)
        finally:
            await self._settle()

    def _finished(self, f: pb.Finished) -> None:
        assert self.ctx.usage is not None
        self.ctx.usage.add(f.prompt_tokens, f.completion_tokens, self.outcome.cached)
        self._counted = True
        if self._keep_text is not None:  # log_content: explicitly enabled
            r = self.request
            self.ctx.content = {
                "prompt": r.prompt if r.messages is None else [[m.role, m.content] for m in r.messages],
                "completion": "".join(self._keep_text),
            }
        self.outcome.finish_reason = f.finish_reason
        self.outcome.prompt_tokens = f.prompt_tokens
        self.outcome.completion_tokens = f.completion_tokens
        self.metrics.tokens.labels(self.label).inc(f.completion_tokens)
        self.metrics.traffic.finished(f.completion_tokens)

    async def _settle(self) -> None:
        """The generation's end, however it ended: a stream cut short (the caller gone,
        a failure) is counted by the tokens it relayed, in the ledger and the budget."""
        if (
            not self._counted
            and self.ctx.usage is not None
            and (self._streamed or self.outcome.prompt_tokens)
        ):
            self._counted = True
            self.ctx.usage.add(self.outcome.prompt_tokens, self._streamed)
        if self._admission is not None:
            adm, self._admission = self._admission, None
            # the prompt counted once for all of a request's choices, as OpenAI counts it
            prompt = 0 if self.choice else self.outcome.prompt_tokens
            await self.limiter.finish(adm, prompt + max(self.outcome.completion_tokens, self._streamed))
