"""Generations as calls of one long-lived ``Worker.Session`` stream (``protocol.session``):
each call gets exactly its own messages, its own end or error, its own cancellation; a
broken stream fails every call on it as a dead peer does, and the next opens a new one."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cyllm import errors
from cyllm.protocol import pb, rpc
from cyllm.protocol.plane import Plane
from cyllm.protocol.server import create_server
from cyllm.protocol.session import MESSAGES, Session, Sessions
from tests.polling import returns, until


class Worker(rpc.WorkerServicer):
    """Each generation yields ``max_tokens`` deltas naming its prompt; prompts starting
    with ``fail`` raise, ``slow`` ones wait between tokens, ``hang`` ones never go on."""

    def __init__(self) -> None:
        self.sessions = 0
        self.messages: list[int] = []  # frames per message received
        self.ended: list[str] = []
        self.open = Sessions()

    async def _generate(self, request: pb.GenerateRequest, request_id: str):
        try:
            yield pb.GenerateResponse(started=pb.Started(prompt_tokens=1))
            if request.prompt.startswith("fail"):
                raise errors.ContextLengthExceeded("too long", param="messages")
            if request.prompt.startswith("hang"):
                await asyncio.Event().wait()
            for i in range(request.sampling.max_tokens):
                await asyncio.sleep(0.05 if request.prompt.startswith("slow") else 0)
                yield pb.GenerateResponse(delta=pb.Delta(text=f" {request.prompt}.{i}", token_ids=[i]))
            yield pb.GenerateResponse(
                finished=pb.Finished(finish_reason="length", completion_tokens=request.sampling.max_tokens)
            )
        finally:
            self.ended.append(request.prompt)

    async def Session(self, requests, context):
        self.sessions += 1

        async def counted():
            async for batch in requests:
                self.messages.append(len(batch.frames))
                yield batch

        async for batch in self.open.serve(counted(), self._generate, MESSAGES, lambda exc: None):
            yield batch


@pytest.fixture
async def served():
    worker = Worker()
    server = create_server(Plane())
    rpc.add_WorkerServicer_to_server(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = rpc.WorkerStub(channel)
    session = Session(lambda: stub.Session())
    yield worker, session, (server, port)
    await session.close()
    await channel.close()
    await server.stop(None)


def request(prompt: str, tokens: int = 20) -> pb.GenerateRequest:
    r = pb.GenerateRequest(model="m", prompt=prompt)
    r.sampling.max_tokens = tokens
    return r


async def collect(session: Session, prompt: str, tokens: int = 20) -> tuple[str, list[int], str]:
    text, ids, finish = [], [], ""
    async for msg in session.generate(request(prompt, tokens), "rid"):
        if msg.HasField("delta"):
            text.append(msg.delta.text)
            ids.extend(msg.delta.token_ids)
        elif msg.HasField("finished"):
            finish = msg.finished.finish_reason
    return "".join(text), ids, finish


async def test_concurrent_calls_share_one_stream_and_each_gets_its_own(served):
    worker, session, _ = served
    results = await asyncio.gather(*(collect(session, f"p{i}", 30) for i in range(40)))
    for i, (text, ids, finish) in enumerate(results):
        assert text == "".join(f" p{i}.{k}" for k in range(30))
        assert ids == list(range(30)) and finish == "length"
    assert worker.sessions == 1


async def test_calls_started_together_go_out_in_one_message(served):
    """A write costs more than the frames in it: while a call runs, the calls started in
    one turn of the event loop share one; a lone call goes out at once."""
    worker, session, _ = served
    running = asyncio.create_task(collect(session, "slow", 10))
    await until(lambda: returns(worker.messages), timeout=5, what="the first message")
    assert worker.messages == [1]
    results = await asyncio.gather(*(collect(session, f"p{i}", 2) for i in range(20)))
    assert all(finish == "length" for _, _, finish in results)
    assert worker.messages == [1, 20]
    assert (await running)[2] == "length"


async def test_one_calls_error_is_its_own_as_a_status_would_carry_it(served):
    _, session, _ = served
    ok = asyncio.create_task(collect(session, "slow-ok", 5))
    with pytest.raises(errors.ContextLengthExceeded) as err:
        await collect(session, "fail-now")
    assert err.value.param == "messages"
    assert (await ok)[2] == "length"


async def test_cancelling_one_call_stops_only_it_on_the_worker(served):
    worker, session, _ = served
    other = asyncio.create_task(collect(session, "slow-other", 6))
    call = session.generate(request("slow-cancelled", 1000), "rid")
    got = 0
    async for msg in call:
        got += msg.HasField("delta")
        if got == 2:
            break  # leaving the iteration cancels the call
    await until(
        lambda: returns(worker.ended),
        lambda ended: "slow-cancelled" in ended,
        timeout=2,
        what="the cancelled call to end on the worker",
    )
    assert (await other)[2] == "length"


async def test_a_silent_worker_is_given_up_on_and_told_to_stop_but_a_slow_reader_is_not(served):
    """The coordinator's stall rule (``_paced``): only waiting for a worker counts, so a
    reader that lags behind a worker that keeps sending is not a stall."""
    from cyllm.coordinator.services.inference import _paced

    worker, session, _ = served
    with pytest.raises(errors.Unavailable, match="worker w1 produced nothing for 0.3s"):
        async for _ in _paced(session.generate(request("hang"), "rid"), 0.3, "w1"):
            pass
    await until(
        lambda: returns(worker.ended),
        lambda ended: "hang" in ended,
        timeout=2,
        what="the call to be cancelled on the worker",
    )

    text, finish = [], ""
    async for msg in _paced(session.generate(request("slow-read", 12), "rid"), 0.3, "w1"):
        await asyncio.sleep(0.4)  # longer than the timeout at every message
        text.append(msg.delta.text)
        finish = msg.finished.finish_reason or finish
    assert finish == "length" and "".join(text).count("slow-read.") == 12


async def test_a_broken_stream_fails_its_calls_as_unreachable_and_the_next_opens_anew(served):
    _, session, (server, port) = served
    calls = [asyncio.create_task(collect(session, f"slow-{i}", 1000)) for i in range(3)]
    await asyncio.sleep(0.3)
    await server.stop(None)  # the worker goes away mid-generation
    for task in calls:
        with pytest.raises(errors.Unreachable):
            await asyncio.wait_for(task, 10)
    # a worker at the same address again: the next generation opens a new stream on it
    fresh = Worker()
    again = create_server(Plane())
    rpc.add_WorkerServicer_to_server(fresh, again)
    again.add_insecure_port(f"127.0.0.1:{port}")
    await again.start()
    try:
        for _ in range(50):  # the channel reconnects with a backoff
            try:
                text, _, finish = await collect(session, "back", 3)
                break
            except errors.Unreachable:
                await asyncio.sleep(0.2)
        assert (text, finish) == (" back.0 back.1 back.2", "length")
        assert fresh.sessions == 1
    finally:
        await again.stop(None)


async def test_a_draining_worker_ends_its_sessions_and_what_still_runs_moves_on(served):
    """``Sessions.end()`` (a worker stopping) ends the stream: a call still running
    fails as on a dead worker (the coordinator resumes it elsewhere), and the next
    generation opens a new stream."""
    worker, session, _ = served
    running = asyncio.create_task(collect(session, "slow-left", 1000))
    await asyncio.sleep(0.2)
    worker.open.end()
    with pytest.raises(errors.Unreachable):
        await asyncio.wait_for(running, 5)
    assert (await collect(session, "next", 2))[2] == "length"
    assert worker.sessions == 2


def test_a_batch_waiting_to_go_out_merges_each_calls_deltas_in_order():
    from cyllm.protocol.session import _encoded, _Frame

    def delta(call, text, i):
        return _Frame(call, pb.GenerateResponse(delta=pb.Delta(text=text, token_ids=[i])))

    frames = [
        _Frame(1, pb.GenerateResponse(started=pb.Started(prompt_tokens=2))),
        delta(1, " a", 1),
        delta(2, " x", 9),
        delta(1, " b", 2),
        delta(1, " c", 3),
        _Frame(1, end=pb.CallEnd()),
        delta(2, " y", 10),
    ]
    out = _encoded(frames, MESSAGES)
    mine = [f for f in out if f.call == 1]
    assert [f.WhichOneof("kind") for f in mine] == ["event", "event", "end"]
    assert mine[1].event.delta.text == " a b c" and list(mine[1].event.delta.token_ids) == [1, 2, 3]
    theirs = [f for f in out if f.call == 2]
    assert len(theirs) == 1 and theirs[0].event.delta.text == " x y"
