"""The servers' one edge (``protocol.server``): every handler shape goes through the
interceptor, and an error raised in a handler arrives as its status with its code."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyllm import errors
from cyllm.coordinator.main import CoordinatorServer
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.protocol import pb, rpc, status
from cyllm.protocol.client import Stream, open_channel, unary
from cyllm.protocol.plane import load_plane


@pytest.fixture
async def coordinator(tmp_path):
    server = CoordinatorServer(CoordinatorSettings(port=0, metrics_port=None, files_dir=tmp_path / "files"))
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}", load_plane())
    yield channel
    await channel.close()
    await server.stop()


async def test_a_unary_handlers_error_is_its_status_and_code(coordinator):
    stub = rpc.TrainingStub(coordinator)
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await stub.GetTrainingJob(pb.TrainingJobRequest(id="ftjob-nope"))
    assert raw.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(raw.value.trailing_metadata())[status.ERROR_KEY] == "not_found"
    with pytest.raises(errors.NotFound, match="ftjob-nope") as err:  # the client edge
        await unary(stub.GetTrainingJob, pb.TrainingJobRequest(id="ftjob-nope"))
    assert err.value.param == "id"


async def test_streaming_handlers_errors_arrive_the_same_way(coordinator):
    with pytest.raises(errors.ModelNotFound):  # server stream
        async for _ in Stream(
            rpc.InferenceStub(coordinator).Generate(pb.GenerateRequest(model="nope", prompt="x"))
        ):
            pass

    async def chunks():
        yield pb.FileChunk(filename="x.jsonl", purpose="assistants", data=b"{}")

    with pytest.raises(errors.InvalidRequest, match="purpose"):  # client stream
        await unary(rpc.FilesStub(coordinator).UploadFile, chunks())


async def test_a_handler_that_writes_to_its_context_still_works(coordinator):
    # gRPC's own health Watch writes with context.write instead of yielding.
    health = health_pb2_grpc.HealthStub(coordinator)
    watch = health.Watch(health_pb2.HealthCheckRequest())
    first = await watch.read()
    watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    check = await health.Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_an_unreachable_peer_is_told_apart_from_an_answer(unused_tcp_port):
    async with open_channel(f"127.0.0.1:{unused_tcp_port}", load_plane()) as channel:
        with pytest.raises(errors.Unreachable):
            await unary(rpc.ModelsStub(channel).ListModels, pb.ListModelsRequest(), timeout=3)
