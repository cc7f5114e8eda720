"""Merging deltas while the reader lags: same text, same ids, same order, same end."""

from __future__ import annotations

import asyncio

import pytest

from cyllm import errors
from cyllm.protocol import pb
from cyllm.protocol.coalesce import coalesced


def delta(i: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(delta=pb.Delta(text=f" w{i}", token_ids=[i]))


def stream(n: int, log: list[str] | None = None, fail_at: int | None = None):
    async def gen():
        try:
            yield pb.GenerateResponse(started=pb.Started(prompt_tokens=3))
            for i in range(n):
                if i == fail_at:
                    raise errors.Unavailable("worker w became unreachable")
                yield delta(i)
                await asyncio.sleep(0)
            yield pb.GenerateResponse(
                finished=pb.Finished(finish_reason="length", prompt_tokens=3, completion_tokens=n)
            )
        finally:
            if log is not None:
                log.append("source closed")

    return gen()


def flat(msgs):
    kinds = [m.WhichOneof("event") for m in msgs]
    text = "".join(m.delta.text for m in msgs if m.HasField("delta"))
    ids = [t for m in msgs if m.HasField("delta") for t in m.delta.token_ids]
    return kinds, text, ids


async def test_a_lagging_reader_gets_fewer_messages_with_the_same_content():
    msgs = []
    async for m in coalesced(stream(200)):
        msgs.append(m)
        await asyncio.sleep(0.01 if len(msgs) < 3 else 0)  # slow at first: a backlog forms
    kinds, text, ids = flat(msgs)
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert text == "".join(f" w{i}" for i in range(200)) and ids == list(range(200))
    assert len(msgs) < 200  # merged
    assert msgs[-1].finished.completion_tokens == 200


async def test_a_reader_that_keeps_up_sees_the_stream_unchanged():
    async def paced():
        async for m in stream(5):
            await asyncio.sleep(0.02)
            yield m

    msgs = [m async for m in coalesced(paced())]
    assert [m.SerializeToString() for m in msgs] == [m.SerializeToString() async for m in stream(5)]


async def test_closing_early_closes_the_source():
    log: list[str] = []
    merged = coalesced(stream(10_000, log))
    async for m in merged:
        if m.HasField("delta"):
            break
    await merged.aclose()
    assert log == ["source closed"]


async def test_an_error_arrives_after_what_came_before_it():
    got = []
    with pytest.raises(errors.Unavailable):
        async for m in coalesced(stream(50, fail_at=20)):
            got.append(m)
            await asyncio.sleep(0.001)
    assert flat(got)[2] == list(range(20))


async def test_a_workers_engine_events_merge_before_they_become_messages():
    """The worker merges TextDelta events (TextDelta.joined): text, ids and logprobs
    joined in order; Started and Finished pass through untouched."""
    from cyllm.worker.engines.types import Finished, Started, TextDelta, TokenLogprob

    async def events():
        yield Started(prompt_tokens=3)
        for i in range(100):
            yield TextDelta(f" w{i}", (i,), (TokenLogprob(i, -0.5, f" w{i}"),))
            await asyncio.sleep(0)
        yield Finished("length", 3, 100)

    out = []
    async for e in coalesced(events(), is_delta=lambda e: isinstance(e, TextDelta), join=TextDelta.joined):
        out.append(e)
        await asyncio.sleep(0.01 if len(out) < 3 else 0)
    deltas = [e for e in out if isinstance(e, TextDelta)]
    assert isinstance(out[0], Started) and out[-1] == Finished("length", 3, 100)
    assert len(deltas) < 100
    assert "".join(d.text for d in deltas) == "".join(f" w{i}" for i in range(100))
    assert [i for d in deltas for i in d.token_ids] == list(range(100))
    assert [lp.token_id for d in deltas for lp in d.logprobs] == list(range(100))


async def test_the_source_is_read_at_most_a_buffer_ahead_of_the_reader():
    """Back-pressure: a reader that stops makes the source wait once ``ahead`` items are
    buffered, and a reader that resumes gets them all, then the rest."""
    produced = 0

    async def source():
        nonlocal produced
        for i in range(100):
            produced += 1
            yield delta(i)

    merged = coalesced(source(), ahead=8)
    first = await anext(merged)
    for _ in range(20):
        await asyncio.sleep(0)
    taken = len(first.delta.token_ids)  # merged: what was buffered when the reader came
    assert produced <= taken + 8 + 1  # and a full buffer, and the one waiting for room
    rest = [m async for m in merged]
    assert flat([first, *rest])[2] == list(range(100))


async def test_a_backlog_hands_everything_over_and_its_producers_wait_for_room():
    from cyllm.protocol.coalesce import Backlog

    backlog: Backlog[int] = Backlog(4)
    produced: list[int] = []

    async def producer(start: int) -> None:
        for i in range(start, start + 10):
            await backlog.put(i)
            produced.append(i)

    tasks = [asyncio.create_task(producer(s)) for s in (0, 100, 200)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(produced) == 4  # full: every producer waits
    got: list[int] = []
    while len(got) < 30:
        batch = await backlog.take()
        assert 0 < len(batch) <= 4  # never more than the limit waits
        got += batch
    await asyncio.gather(*tasks)
    assert sorted(got) == sorted(produced) and len(got) == 30
    for start in (0, 100, 200):  # each producer's items in its order
        assert [i for i in got if start <= i < start + 10] == list(range(start, start + 10))
