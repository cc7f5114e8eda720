"""Many generations over one long-lived gRPC call (``Worker.Session``).

A coordinator talks to the same few workers all the time, and a new Python gRPC call
costs about 0.4 ms of CPU on each side — as much as the rest of a short request's work
in either process — while a message on an open stream costs about a quarter of that.
So the coordinator keeps one bidirectional call open per worker and runs each generation
as a numbered *call* on it: a ``start`` frame (the request), the worker's messages for
that call in order, and a last ``CallEnd`` frame carrying what a status would (code,
details, trailing metadata: ``status.py`` reads it exactly as it reads a status); a
``cancel`` frame ends a call early.

What each side sees is what a ``Generate`` call gives it:

* the worker runs ``generate(request, request_id)`` per call, in a task of its own; a
  cancel frame cancels that task (an engine then aborts the sequence), as a cancelled
  call would; when the whole stream ends (the coordinator gone), every call is
  cancelled;
* the coordinator iterates a :class:`SessionCall` as it iterates a ``Stream``: messages,
  then the end or the error the worker raised; if the stream breaks (the worker died,
  the network), every call on it fails with the error the broken call gives
  (``Unreachable`` for a dead peer), and the next generation opens a new stream.

Back-pressure: the worker's frames for all calls go through one bounded queue, so a
coordinator that does not keep up makes each call's producer wait; what waits there is
the engines' events, each call's deltas merged as the writer takes them and only then
made messages (``coalesce.py`` says where tokens merge, and what it is worth).  The
coordinator reads the stream without pause (one slow call must not hold the others), so
a call whose own reader lags
keeps its unread frames — one generation's worth at most — and merges their deltas when
it reads them.  A frame over the plane's message limit (64 MiB; the gateway bounds
requests far below it) would end the whole stream, not one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from cyllm import errors
from cyllm.protocol import pb, status
from cyllm.protocol.coalesce import Backlog, is_delta, joined, merge_runs
from cyllm.protocol.server import Translate, explained, untranslated

E = TypeVar("E")
OUTGOING = 256  # frames waiting to be sent, all calls together


@dataclass(frozen=True)
class Encoder(Generic[E]):
    """How a worker's events become a call's messages: ``is_delta`` and ``join`` merge
    a call's consecutive deltas, ``message`` makes one message of an event.  The
    worker's events are its engines' (``TextDelta`` ...), merged before they become
    messages, so a lagging stream costs one message built per batch of tokens."""

    message: Callable[[E], pb.GenerateResponse]
    join: Callable[[list[Any]], E]  # given a run of the events ``is_delta`` picked
    is_delta: Callable[[E], bool] = is_delta


MESSAGES: Encoder[pb.GenerateResponse] = Encoder(lambda msg: msg, join=joined)  # events that are messages
Generate = Callable[[pb.GenerateRequest, str], AsyncGenerator[E, None]]


# -- the worker's side -------------------------------------------------------------------

_END = object()


class Sessions:
    """A worker's open sessions: ``end()`` ends them (a draining worker, once its
    generations are done), so its server stops without waiting out its grace period; a
    call still running then fails over at the coordinator like one on a dead worker."""

    def __init__(self) -> None:
        self._outgoing: set[Backlog[Any]] = set()

    def serve(
        self,
        requests: AsyncIterator[pb.SessionRequests],
        generate: Generate[E],
        encoder: Encoder[E],
        translate: Translate = untranslated,
    ) -> AsyncGenerator[pb.SessionEvents, None]:
        return _serve(requests, generate, encoder, translate, self._outgoing)

    def end(self) -> None:
        for out in self._outgoing:
            out.put_nowait(_END)


@dataclass(frozen=True, slots=True)
class _Frame(Generic[E]):
    """One of a call's events waiting to go out, or its end."""

    call: int
    event: E | None = None
    end: pb.CallEnd | None = None


async def _serve(
    requests: AsyncIterator[pb.SessionRequests],
    generate: Generate[E],
    encoder: Encoder[E],
    translate: Translate,
    registry: set[Backlog[Any]],
) -> AsyncGenerator[pb.SessionEvents, None]:
    """The messages of a ``Session`` call: each ``start`` run by ``generate`` in a task;
    every frame ready when a message goes out travels in it, each call's deltas merged
    (the worker's one merge: what waits for the writer)."""
    out: Backlog[Any] = Backlog(OUTGOING)
    running: dict[int, asyncio.Task[None]] = {}

    async def run(call: int, request: pb.GenerateRequest, request_id: str) -> None:
        try:
            async with aclosing(generate(request, request_id)) as events:
                async for event in events:
                    if out.full():  # spelled out: no coroutine per token unless it must wait
                        await out.room()
                    out.put_nowait(_Frame(call, event))
            end = pb.CallEnd()
        except asyncio.CancelledError:
            return  # cancelled by the caller, who expects nothing more
        except Exception as exc:
            code, details, trailing = status.end_of(explained(exc, translate))
            end = pb.CallEnd(code=code, details=details, trailing=trailing)
        finally:
            running.pop(call, None)
        await out.put(_Frame(call, end=end))

    async def read() -> None:
        try:
            async for batch in requests:
                for frame in batch.frames:
                    op = frame.WhichOneof("op")
                    if op == "start" and frame.call not in running:
                        running[frame.call] = asyncio.create_task(
                            run(frame.call, frame.start, frame.request_id)
                        )
                    elif op == "cancel" and (task := running.get(frame.call)) is not None:
                        task.cancel()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            return  # the caller went away: the call's own end cancels what runs

    reader = asyncio.create_task(read())
    registry.add(out)
    try:
        ending = False
        while not ending:
            items = await out.take()
            frames = [i for i in items if i is not _END]
            ending = len(frames) < len(items)
            if frames:
                yield pb.SessionEvents(frames=_encoded(frames, encoder))
    finally:
        registry.discard(out)
        reader.cancel()
        for task in list(running.values()):
            task.cancel()


def _encoded(frames: list[_Frame[E]], encoder: Encoder[E]) -> list[pb.SessionEvent]:
    """``frames`` as messages, each call's consecutive deltas made one first."""
    by_call: dict[int, list[_Frame[E]]] = {}
    for frame in frames:
        by_call.setdefault(frame.call, []).append(frame)
    out: list[pb.SessionEvent] = []
    for call, mine in by_call.items():
        items: list[Any] = [f.event if f.end is None else f.end for f in mine]
        if len(items) > 1:
            items = merge_runs(
                items, lambda i: not isinstance(i, pb.CallEnd) and encoder.is_delta(i), encoder.join
            )
        out += [
            pb.SessionEvent(call=call, end=i)
            if isinstance(i, pb.CallEnd)
            else pb.SessionEvent(call=call, event=encoder.message(i))
            for i in items
        ]
    return out


# -- the coordinator's side ---------------------------------------------------------------


class Session:
    """One open ``Session`` call to a worker, opened on the first generation and again
    after it breaks."""

    def __init__(self, open_call: Callable[[], Any]) -> None:
        self._open_call = open_call
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._calls: dict[int, SessionCall] = {}
        self._numbers = itertools.count(1)
        self._writing = asyncio.Lock()  # one write at a time on a gRPC stream
        self._unsent: list[tuple[Any, pb.SessionRequest]] = []  # (stream, frame): the next write
        self._cancels: set[asyncio.Task[None]] = set()  # cancel frames being sent

    def generate(self, request: pb.GenerateRequest, request_id: str) -> SessionCall:
        return SessionCall(self, next(self._numbers), request, request_id)

    async def _start(self, call: SessionCall, frame: pb.SessionRequest) -> None:
        if self._call is None:
            self._call = self._open_call()
            self._reader = asyncio.create_task(self._read(self._call))
        call.stream = self._call
        self._calls[call.number] = call
        await self._send(frame, call.stream)

    async def _send(self, frame: pb.SessionRequest, stream: Any) -> None:
        """Write ``frame`` on ``stream``, with whatever else waits: while other calls
        run, the frames of one turn of the event loop go out as one message (a write
        costs the gateway about 0.1 ms of gRPC's CPU, the largest part of a short
        request's at 64 connections; a lone call is not kept waiting a turn, which costs
        it 0.05 ms), and a write in progress makes those queued meanwhile the next."""
        self._unsent.append((stream, frame))
        if len(self._calls) > 1:  # others running: those of this turn queue theirs
            await asyncio.sleep(0)
        async with self._writing:
            if not self._unsent:
                return  # went out with an earlier write
            # frames for a stream that has ended since are dropped: their calls failed
            # with it
            frames = [f for s, f in self._unsent if s is self._call]
            self._unsent = []
            if self._call is not stream:
                raise errors.Unreachable("the session with the worker ended")
            try:
                await stream.write(pb.SessionRequests(frames=frames))
            except grpc.aio.AioRpcError as exc:
                raise status.from_grpc(exc) from None
            except asyncio.InvalidStateError:  # the stream ended as we wrote
                if self._call is stream:
                    self._call = None
                raise errors.Unreachable("the session with the worker ended") from None

    def cancel_later(self, call: SessionCall) -> None:
        task = asyncio.ensure_future(self._cancel(call))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, call: SessionCall) -> None:
        with contextlib.suppress(Exception):  # a broken stream has cancelled it already
            await self._send(pb.SessionRequest(call=call.number, cancel=pb.CallCancel()), call.stream)

    async def _read(self, stream: Any) -> None:
        err: errors.CyllmError = errors.Unreachable("the worker ended the session")
        try:
            async for batch in stream:
                for frame in batch.frames:
                    call = self._calls.get(frame.call)
                    if call is not None:
                        call.deliver(frame)
        except grpc.aio.AioRpcError as exc:
            err = status.from_grpc(exc)
        except asyncio.CancelledError:
            err = errors.Unreachable("the session was closed")
            raise
        finally:
            if self._call is stream:
                self._call = None
            for call in [c for c in self._calls.values() if c.stream is stream]:
                call.fail(err)

    def forget(self, call: SessionCall) -> None:
        self._calls.pop(call.number, None)

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader


class SessionCall:
    """One generation on a session: iterate it once (messages, then the end or the
    error raised); ``cancel()`` ends it early, from any task."""

    def __init__(self, session: Session, number: int, request: pb.GenerateRequest, request_id: str) -> None:
        self.session = session
        self.number = number
        self.stream: Any = None
        self._request = request
        self._request_id = request_id
        self._frames: list[pb.SessionEvent] = []
        self._failed: errors.CyllmError | None = None
        self._ready = asyncio.Event()
        self._done = False

    def deliver(self, frame: pb.SessionEvent) -> None:
        self._frames.append(frame)
        self._ready.set()

    def fail(self, err: errors.CyllmError) -> None:
        self._failed = err
        self._ready.set()

    def cancel(self) -> None:
        if self._done:
            return
        self._done = True
        self.session.forget(self)
        self._ready.set()
        if self.stream is not None:  # started: the worker must stop it
            self.session.cancel_later(self)

    async def __aiter__(self) -> AsyncGenerator[pb.GenerateResponse, None]:
        try:
            await self.session._start(
                self, pb.SessionRequest(call=self.number, start=self._request, request_id=self._request_id)
            )
            while not self._done:
                await self._ready.wait()
                self._ready.clear()
                frames, self._frames = self._frames, []
                events = [f.event for f in frames if f.WhichOneof("kind") == "event"]
                for msg in merge_runs(events, is_delta, joined):  # a backlog merges
                    yield msg
                end = next((f.end for f in frames if f.WhichOneof("kind") == "end"), None)
                if end is not None:
                    self._done = True
                    self.session.forget(self)
                    if end.code:
                        raise status.from_end(end.code, end.details, dict(end.trailing))
                    return
                if self._failed is not None:
                    self._done = True
                    raise self._failed
            raise errors.RequestCancelled("the call was cancelled")
        finally:
            self.cancel()
