"""A generation stream whose deltas merge while its reader lags.

An engine can make tokens faster than the next hop takes messages (two gRPC hops, then
an SSE chunk per message).  ``coalesced`` reads the stream ahead into a buffer and,
each time the reader asks, hands over everything buffered, consecutive ``Delta``s merged
into one (text joined, token ids concatenated): a reader that keeps up sees the stream
unchanged, one that lags gets fewer, larger messages instead of a growing backlog — the
way vLLM's output collector merges pending outputs.  The text, the ids and the usage are
exactly those of the stream.  Closing the merged stream closes the source (an engine
then aborts the request), as closing the source itself would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from cyllm.protocol import pb

_END = object()


async def coalesced(events: AsyncIterator[pb.GenerateResponse],
                    ahead: int = 256) -> AsyncIterator[pb.GenerateResponse]:
    """``events`` with deltas merged while unread; at most ``ahead`` messages buffered."""
    buffer: asyncio.Queue[object] = asyncio.Queue(ahead)

    async def read() -> None:
        try:
            async for msg in events:
                await buffer.put(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001  (handed to the reader, in order)
            await buffer.put(exc)
            return
        await buffer.put(_END)

    reader = asyncio.create_task(read())
    try:
        while True:
            items = [await buffer.get()]
            while not buffer.empty() and len(items) < ahead:
                items.append(buffer.get_nowait())
            for msg in _merged(items):
                if msg is _END:
                    return
                if isinstance(msg, BaseException):
                    raise msg
                yield msg  # type: ignore[misc]
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _merged(items: list[object]) -> list[object]:
    out: list[object] = []
    for item in items:
        last = out[-1] if out else None
        if (isinstance(item, pb.GenerateResponse) and item.WhichOneof("event") == "delta"
                and isinstance(last, pb.GenerateResponse) and last.WhichOneof("event") == "delta"):
            merged = pb.GenerateResponse()
            merged.delta.text = last.delta.text + item.delta.text
            merged.delta.token_ids.extend(last.delta.token_ids)
            merged.delta.token_ids.extend(item.delta.token_ids)
            merged.delta.logprobs.extend(last.delta.logprobs)
            merged.delta.logprobs.extend(item.delta.logprobs)
            out[-1] = merged
        else:
            out.append(item)
    return out
