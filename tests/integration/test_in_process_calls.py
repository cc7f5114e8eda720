"""A servicer called in-process (``protocol.local``, the gateway hosting its coordinator)
fails, times out and ends as the same servicer called over a real gRPC socket."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc
import pytest

from cyllm import errors
from cyllm.protocol import pb, rpc
from cyllm.protocol.client import Stream, unary
from cyllm.protocol.local import LocalStub
from cyllm.protocol.plane import Plane
from cyllm.protocol.server import create_server
from tests.polling import returns, until

FOREIGN = ConnectionRefusedError("the shared store is gone")  # ours to explain, by translate
RAISED = {
    "invalid": errors.InvalidRequest("temperature must be at most 2", param="temperature"),
    "context": errors.ContextLengthExceeded("the prompt is 9000 tokens", param="messages"),
    "model": errors.ModelNotFound("no model named 'x'", param="model"),
    "memory": errors.InsufficientMemory("needs 3 GiB, 1 GiB free"),
    "forbidden": errors.Forbidden("not yours"),
    "overloaded": errors.Overloaded("the queue is full", retry_after=7),
    "unavailable": errors.Unavailable("no worker serves it"),
    "unreachable": errors.Unreachable("worker w1 unreachable"),  # its peer's, not ours
    "cancelled": errors.RequestCancelled("the client left"),
    "engine": errors.EngineError("the engine failed"),
    "foreign": FOREIGN,
    "bug": RuntimeError("boom"),
}


def translate(exc: Exception) -> errors.CyllmError | None:
    return errors.Unavailable(f"shared state unreachable: {exc}") if exc is FOREIGN else None


class Servicer(rpc.InferenceServicer):
    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.seen: list[tuple[pb.GenerateRequest, dict]] = []

    async def Generate(self, request, context):
        self.seen.append((request, dict(context.invocation_metadata())))
        request.model = "changed by the servicer"
        try:
            yield pb.GenerateResponse(started=pb.Started(prompt_tokens=3))
            if request.prompt in RAISED:
                raise RAISED[request.prompt]
            for i in range(int(request.sampling.max_tokens)):
                await asyncio.sleep(0.02)
                yield pb.GenerateResponse(delta=pb.Delta(text=f" w{i}"))
        finally:
            self.closed.set()

    async def Embed(self, request, context):
        if request.inputs and request.inputs[0] in RAISED:
            raise RAISED[request.inputs[0]]
        await asyncio.sleep(float(request.dimensions))
        return pb.EmbedResponse()


@pytest.fixture
async def both():
    """(servicer, stub over gRPC, stub in-process) on one servicer."""
    servicer = Servicer()
    server = create_server(Plane(), translate)
    rpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, rpc.InferenceStub(channel), LocalStub(servicer, translate)
    await channel.close()
    await server.stop(None)


def _described(err: BaseException) -> tuple:
    message = err.message if not isinstance(err, errors.EngineError) else "(gRPC's wording)"
    return type(err), message, getattr(err, "param", None), getattr(err, "retry_after", None)


async def _stream_error(stub, prompt: str) -> BaseException:
    request = pb.GenerateRequest(model="m", prompt=prompt)
    with pytest.raises(errors.CyllmError) as caught:
        async for _ in Stream(stub.Generate(request, timeout=10)):
            pass
    return caught.value


@pytest.mark.parametrize("name", list(RAISED))
async def test_a_failure_arrives_as_it_would_over_grpc(both, name):
    _, remote, local = both
    over_grpc = await _stream_error(remote, name)
    in_process = await _stream_error(local, name)
    assert _described(in_process) == _described(over_grpc)
    request = pb.EmbedRequest(model="m", inputs=[name])
    with pytest.raises(errors.CyllmError) as a:
        await unary(remote.Embed, request, timeout=10)
    with pytest.raises(errors.CyllmError) as b:
        await unary(local.Embed, request, timeout=10)
    assert _described(b.value) == _described(a.value)


async def test_the_peers_unreachable_is_not_the_callers():
    """A client fails over on Unreachable (its channel is down); a servicer's own
    Unreachable (about its workers) must not look like that, in-process or not."""
    err = await _stream_error(LocalStub(Servicer(), translate), "unreachable")
    assert type(err) is errors.Unavailable


async def test_the_servicer_gets_its_own_request_copy_and_the_callers_metadata(both):
    servicer, _, local = both
    request = pb.GenerateRequest(model="m", prompt="hi")
    request.sampling.max_tokens = 1
    meta = (("x-cyllm-tenant", "alice"), ("x-request-id", "r1"))
    replies = [m async for m in Stream(local.Generate(request, timeout=10, metadata=meta))]
    assert [m.WhichOneof("event") for m in replies] == ["started", "delta"]
    assert request.model == "m"  # untouched: the servicer changed its own copy
    assert servicer.seen[0][1] == dict(meta)


@pytest.mark.parametrize("way", ["over-grpc", "in-process"])
async def test_a_stream_left_early_ends_the_servicers_generation(both, way):
    servicer, remote, local = both
    stub = remote if way == "over-grpc" else local
    request = pb.GenerateRequest(model="m", prompt="hi")
    request.sampling.max_tokens = 1000
    async with aclosing(aiter(Stream(stub.Generate(request, timeout=10)))) as replies:
        async for msg in replies:
            if msg.HasField("delta"):
                break
    if way == "in-process":  # at once: its finally ran in the reader's own close
        assert servicer.closed.is_set()
    await asyncio.wait_for(servicer.closed.wait(), 5)


@pytest.mark.parametrize("way", ["over-grpc", "in-process"])
async def test_the_deadline_ends_a_call_with_unavailable(both, way):
    servicer, remote, local = both
    stub = remote if way == "over-grpc" else local
    request = pb.GenerateRequest(model="m", prompt="hi")
    request.sampling.max_tokens = 1000  # 20 s of tokens
    with pytest.raises(errors.Unavailable):
        async for _ in Stream(stub.Generate(request, timeout=0.3)):
            pass
    await asyncio.wait_for(servicer.closed.wait(), 5)
    with pytest.raises(errors.Unavailable):
        await unary(stub.Embed, pb.EmbedRequest(model="m", dimensions=5), timeout=0.3)


async def test_a_cancel_from_another_task_ends_the_readers_stream(both):
    servicer, _, local = both
    request = pb.GenerateRequest(model="m", prompt="hi")
    request.sampling.max_tokens = 1000
    call = local.Generate(request, timeout=10)
    got = []

    async def read() -> None:
        async for msg in Stream(call):
            got.append(msg)

    reader = asyncio.create_task(read())
    await until(lambda: returns(len(got)), lambda n: n >= 3, timeout=5, what="three replies")
    call.cancel()
    with pytest.raises(errors.RequestCancelled):
        await asyncio.wait_for(reader, 5)
    assert servicer.closed.is_set()
    assert len(got) < 10
