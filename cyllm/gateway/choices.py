"""A request's ``n`` choices (OpenAI's ``n``): ``n`` generations of one request,
started together, answered together, their streams read as one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

from starlette.requests import HTTPConnection

from cyllm.gateway.generation import Generation
from cyllm.gateway.request import GenerationRequest
from cyllm.gateway.usage import Usage

T = TypeVar("T")
_END = object()


async def started(conn: HTTPConnection, request: GenerationRequest, *, whole: bool) -> list[Generation]:
    """The request's ``n`` generations, started together (choice ``i`` samples with
    ``seed + i``: ``GenerationRequest.to_proto``); if one cannot start, those that did
    are cancelled and its error is raised."""
    gens = [Generation(conn, request, whole=whole, choice=i) for i in range(request.n)]
    if request.n == 1:  # no task of its own: most requests
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


def usage(gens: list[Generation]) -> Usage:
    """What the request's choices used, once they have finished."""
    found = gens[0].ctx.usage
    assert found is not None, "started generations have a usage"
    return found


@contextlib.asynccontextmanager
async def merged(streams: list[AsyncGenerator[T, None]]) -> AsyncIterator[AsyncIterator[T]]:
    """The items of ``streams`` as they come (one stream: itself, untouched); leaving
    early cancels the rest, which closes them (a generation's stream cancels upstream)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
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
