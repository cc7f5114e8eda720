"""Protocol-independent pieces of a generation as the gateway sees it.

Every surface (OpenAI's routes, the native routes, the WebSocket) builds a
``GenerateRequest`` with :func:`build_request` and runs it as a :class:`Generation`,
which reads the first event before any response is sent, so a refused request still
gets a proper 4xx/5xx status instead of a broken stream.  After that, ``events()`` is
the one stream every surface formats: text pieces, then ``Done`` or ``Failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from pydantic import BaseModel
from starlette.requests import HTTPConnection, Request

from cyllm import errors
from cyllm.gateway.client import coordinator
from cyllm.gateway.context import Usage, context
from cyllm.protocol import pb
from cyllm.protocol.coalesce import coalesced

T = TypeVar("T")


PRIORITY_SCOPE = "priority"
MAX_CHOICES = 16  # n: each choice is a generation of its own


async def _hung_up(request: Request) -> None:
    """Returns once the client has disconnected.  The body has been read, so the next
    ASGI message is the disconnect, as Starlette's streaming responses wait for it (no
    polling: ``is_disconnected`` costs a cancel scope per look)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def token_biases(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token ids as strings -> -100..100) as ids -> biases."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) > 2**31 - 1:
            raise errors.InvalidRequest(f"logit_bias key {key[:40]!r} is not a token id",
                                        param="logit_bias")
        if not -100 <= value <= 100:
            raise errors.InvalidRequest(f"logit_bias for token {key} is {value}; it must be "
                                        "between -100 and 100", param="logit_bias")
        out[int(key)] = value
    return out


def build_request(
    request_id: str,
    model: str,
    *,
    prompt: str | None = None,
    messages: Sequence[tuple[str, str]] | Sequence[pb.ChatMessage] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    priority: int = 0,
    constraint: pb.Constraint | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float | None = None,
    logit_bias: dict[int, float] | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    tools: str = "",
    top_logprobs: int | None = None,
) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(stop=[stop] if isinstance(stop, str) else list(stop or []))
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    if constraint is not None:
        sampling.constraint.CopyFrom(constraint)
    sampling.presence_penalty, sampling.frequency_penalty = presence_penalty, frequency_penalty
    if repetition_penalty is not None:
        sampling.repetition_penalty = repetition_penalty
    sampling.logit_bias.update(logit_bias or {})
    sampling.min_tokens, sampling.ignore_eos = min_tokens, ignore_eos
    if top_logprobs is not None:
        sampling.top_logprobs = top_logprobs
    for m in messages or ():  # before protobuf, which refuses them with a bare exception
        if not isinstance(m, pb.ChatMessage):
            check_text(list(m), "messages")
    chat = [m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m[0], content=m[1])
            for m in messages or ()]
    for param, texts in (("prompt", [prompt or ""]),
                         ("messages", [t for m in chat for t in _texts(m)]),
                         ("stop", list(sampling.stop)), ("tools", [tools])):
        check_text(texts, param)
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=sampling, priority=priority,
                             tools=tools)
    if messages is not None:
        req.messages.CopyFrom(pb.ChatMessages(messages=chat))
    else:
        req.prompt = prompt or ""
    return req


IDEMPOTENCY_HEADER = "Idempotency-Key"


def idempotency_key(conn: HTTPConnection) -> str:
    """The request's Idempotency-Key ('' when none): 1 to 255 visible ASCII characters."""
    key = conn.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return ""
    if not 0 < len(key) <= 255 or not all("!" <= c <= "~" for c in key):
        raise errors.InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1 to 255 visible ASCII "
                                    "characters", param=IDEMPOTENCY_HEADER)
    return key


def _texts(m: pb.ChatMessage) -> list[str]:
    return [m.role, m.content, m.tool_call_id] + [t for c in m.tool_calls
                                                  for t in (c.id, c.name, c.arguments)]


def check_text(texts: list[str], param: str) -> None:
    """JSON may carry a lone surrogate (``"\\ud800"``); it is no UTF-8 and no token."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise errors.InvalidRequest(f"{param} holds an unpaired surrogate (\\u{ord(text[exc.start]):x}), "
                                        "which is not valid text", param=param) from None


@dataclass
class Outcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class TokenUsage(BaseModel):
    """Token counts of one generation; each surface's ``Usage`` schema is one of these."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, o: Outcome) -> Self:
        return cls(prompt_tokens=o.prompt_tokens, completion_tokens=o.completion_tokens,
                   total_tokens=o.prompt_tokens + o.completion_tokens)

    @classmethod
    def of_all(cls, outcomes: list[Outcome]) -> Self:
        """Several choices of one prompt: the prompt counted once, as OpenAI counts it."""
        prompt, completion = outcomes[0].prompt_tokens, sum(o.completion_tokens for o in outcomes)
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


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


_END = object()


@contextlib.asynccontextmanager
async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[AsyncIterator[T]]:
    """The items of ``streams`` as they come (one stream: itself, untouched); leaving
    early cancels the rest, which closes them (a generation's stream cancels upstream)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            yield only
        return
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        finally:
            queue.put_nowait(_END)

    tasks = [asyncio.create_task(pump(s)) for s in streams]

    async def items() -> AsyncIterator[T]:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is _END:
                left -= 1
            else:
                yield item

    try:
        yield items()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def started(conn: HTTPConnection, request: pb.GenerateRequest, n: int, *,
                  whole: bool) -> list[Generation]:
    """``n`` generations of ``request`` (OpenAI's ``n``), started together: with a seed,
    choice ``i`` samples with ``seed + i`` (reproducible, and the choices differ); if
    one cannot start, those that did are cancelled and its error is raised."""
    gens = []
    for i in range(n):
        r = pb.GenerateRequest()
        r.CopyFrom(request)
        if i and r.sampling.HasField("seed"):
            r.sampling.seed = (r.sampling.seed + i + 2**63) % 2**64 - 2**63  # int64
        gens.append(Generation(conn, r, whole=whole, choice=i))
    if n == 1:  # no task of its own: most requests
        return [await gens[0].start()]
    results = await asyncio.gather(*(g.start() for g in gens), return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        for g, r in zip(gens, results):
            if not isinstance(r, BaseException):
                await g.close()
        raise failed
    return gens


async def answers(gens: list[Generation]) -> list[str]:
    """Every choice's whole answer (``Generation.text``), together; one choice in the
    caller's own task (most requests: a task and a gather cost a short one about 0.03
    ms)."""
    if len(gens) == 1:
        return [await gens[0].text()]
    return list(await asyncio.gather(*(g.text() for g in gens)))


class Generation:
    """One running generation: ``await start()``, then ``events()`` (streams) or
    ``text()`` (whole answers).

    ``start`` checks the caller's model rights and rate limits before anything is sent
    upstream; the limits are settled (slot freed, tokens counted) when the stream ends.
    """

    def __init__(self, conn: HTTPConnection, request: pb.GenerateRequest, *,
                 whole: bool = False, choice: int = 0) -> None:
        """``whole``: the answer is sent in one piece (not streamed); such a request may
        carry an ``Idempotency-Key`` (a stream cannot be replayed to a retry, so the
        header is ignored there).  ``choice``: which of a request's ``n`` answers this
        is (each has its own id upstream, and its own share of the key)."""
        key = idempotency_key(conn) if whole else ""
        request.idempotency_key = f"{key}#{choice}" if key and choice else key
        state = conn.app.state
        self.ctx = context(conn)
        self.choice = choice
        self._rid = self.ctx.request_id if not choice else f"{self.ctx.request_id}-{choice}"
        self._conn = conn
        self._client, self._request = coordinator(conn), request
        self._events: AsyncIterator[pb.GenerateResponse] | None = None
        self.limiter = state.limiter
        self.metrics = state.metrics
        self._admission = None
        self.outcome = Outcome()
        self.logprobs: list[pb.TokenLogprob] = []  # a whole answer's, where asked
        self.model = request.model
        self._started = time.perf_counter()
        self._keep_text: list[str] | None = [] if state.settings.log_content else None
        # A whole answer is collected as it comes, never lagging: nothing to merge.
        self._merge = not whole and self._client.unmerged

    async def start(self) -> Generation:
        caller = self.ctx.caller
        caller.check_model(self.model)
        if self._request.priority > 0 and not (caller.admin or PRIORITY_SCOPE in caller.scopes):
            raise errors.Forbidden(f"priority above 0 needs the {PRIORITY_SCOPE!r} scope",
                                   param="priority")
        r = self._request
        chars = len(r.prompt) if r.WhichOneof("input") == "prompt" \
            else sum(len(m.content) for m in r.messages.messages)
        bound = self.limiter.bound(r.sampling.max_tokens if r.sampling.HasField("max_tokens") else None)
        if bound is not None:
            r.sampling.max_tokens = bound
        reserve = self.limiter.reservation(chars, bound)
        self._admission = await self.limiter.admit(caller, reserve)
        self.ctx.ratelimit_headers = self._admission.headers
        self._events = self._client.generate(self._request, self._rid)
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
        return self

    async def close(self) -> None:
        """Give up a started generation that will not be read (cancelled upstream)."""
        if self._events is not None:
            await self._events.aclose()
        await self._settle()

    async def events(self) -> AsyncIterator[Event]:
        """Text pieces, then Done or Failed; closing this early cancels upstream."""
        try:
            async for piece, logprobs in self._pieces():
                yield Text(piece, logprobs)
        except errors.CyllmError as exc:
            yield Failed(exc)
            return
        yield Done(self.outcome)

    async def text(self) -> str:
        """The whole answer (an error raises: nothing was sent yet).  A caller that hangs
        up meanwhile cancels it down to the engine: nobody is left to read the answer.
        It is collected in this task (a task of its own and a wait for either cost a
        short request about 0.04 ms); a watcher cancels it on a hang-up, and that
        cancellation is told from any other by who asked for it."""
        if not isinstance(self._conn, Request):
            return await self._collect()
        me = asyncio.current_task()
        assert me is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            await _hung_up(self._conn)  # type: ignore[arg-type]
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
        async for piece, logprobs in self._pieces():
            pieces.append(piece)
            self.logprobs.extend(logprobs)
        return "".join(pieces)

    async def _pieces(self) -> AsyncIterator[tuple[str, tuple[pb.TokenLogprob, ...]]]:
        assert self._events is not None, "start() first"
        last = None
        try:
            # Deltas that arrive while the client's connection lags merge into one piece.
            stream = coalesced(self._events) if self._merge else self._events
            async with aclosing(stream) as events:
                async for msg in events:
                    kind = msg.WhichOneof("event")
                    if kind == "delta" and not msg.delta.text and msg.delta.logprobs:
                        yield "", tuple(msg.delta.logprobs)  # tokens whose text is held back
                    elif kind == "delta" and msg.delta.text:
                        # A merged delta carries k tokens: the gap since the last one
                        # is shared among them, so the histogram counts tokens.
                        now, k = time.perf_counter(), max(1, len(msg.delta.token_ids))
                        if last is None:
                            self.metrics.ttft.labels(self.model).observe(now - self._started)
                            self.metrics.traffic.first_token(now - self._started)
                            gaps, gap = k - 1, 0.0
                        else:
                            gaps, gap = k, (now - last) / k
                        if gaps:
                            self.metrics.itl.observe(self.model, gap, gaps)
                        last = now
                        if self._keep_text is not None:
                            self._keep_text.append(msg.delta.text)
                        yield msg.delta.text, tuple(msg.delta.logprobs)
                    elif kind == "finished":
                        self._finished(msg.finished)
        finally:
            await self._settle()

    def _finished(self, f: pb.Finished) -> None:
        self.ctx.usage = Usage(self.model, f.prompt_tokens, f.completion_tokens)
        if self._keep_text is not None:  # log_content: explicitly enabled
            r = self._request
            self.ctx.content = {
                "prompt": r.prompt if r.WhichOneof("input") == "prompt"
                else [[m.role, m.content] for m in r.messages.messages],
                "completion": "".join(self._keep_text)}
        self.outcome.finish_reason = f.finish_reason
        self.outcome.prompt_tokens = f.prompt_tokens
        self.outcome.completion_tokens = f.completion_tokens
        self.metrics.tokens.labels(self.model).inc(f.completion_tokens)
        self.metrics.traffic.finished(f.completion_tokens)

    async def _settle(self) -> None:
        if self._admission is not None:
            adm, self._admission = self._admission, None
            await self.limiter.finish(adm, self.outcome.prompt_tokens + self.outcome.completion_tokens)
