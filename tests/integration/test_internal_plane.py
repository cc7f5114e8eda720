"""The internal gRPC plane refuses callers without its credentials (issue 12): a rogue
client calling the coordinator or a worker, a rogue worker registering, a wrong-role
certificate; and a real stack works under mutual TLS."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cyllm import errors
from cyllm.certs import issue
from cyllm.coordinator.main import CoordinatorServer
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol import pb, rpc
from cyllm.protocol.client import Stream, unary
from cyllm.protocol.plane import InternalSettings, Plane, load_plane
from cyllm.worker.main import WorkerServer
from cyllm.worker.settings import WorkerSettings
from tests.integration.conftest import fake_model
from tests.polling import until

ROGUE = Plane(token="not-the-token-of-this-cluster")


async def _call_refused(coro) -> None:
    with pytest.raises(errors.Unavailable, match="internal plane"):
        await coro


async def test_a_rogue_client_can_neither_generate_nor_register_a_worker(make_stack):
    stack = await make_stack()
    address = f"127.0.0.1:{stack.coordinator.port}"
    for plane in (ROGUE, Plane()):  # a wrong token, and none
        async with plane.channel(address) as channel:
            with pytest.raises(errors.Unavailable, match="internal plane"):
                async for _ in Stream(
                    rpc.InferenceStub(channel).Generate(pb.GenerateRequest(model="fake", prompt="hi"))
                ):
                    pass
            rogue = pb.WorkerInfo(
                worker_id="rogue", address="127.0.0.1:1", models=[pb.ModelInfo(id="fake")], capacity=64
            )
            await _call_refused(
                unary(rpc.WorkerPoolStub(channel).RegisterWorker, pb.RegisterWorkerRequest(worker=rogue))
            )
            await _call_refused(unary(rpc.ModelsStub(channel).ListModels, pb.ListModelsRequest()))
            # the health service stays open: it says SERVING and nothing else
            check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert [v.record.worker_id for v in await stack.coordinator.scheduler.workers()] == [
        stack.worker.worker_id
    ]


async def test_a_rogue_client_cannot_make_a_worker_train_or_write_outside_its_folder(make_stack, tmp_path):
    stack = await make_stack(worker={"training_dir": tmp_path / "training"})
    spec = json.dumps({"base_model": "fake", "dataset": "/etc/passwd"})
    async with ROGUE.channel(f"127.0.0.1:{stack.worker.port}") as channel:
        call = Stream(rpc.WorkerStub(channel).Train(pb.TrainRequest(job_id="../../escaped", spec_json=spec)))
        with pytest.raises(errors.Unavailable, match="internal plane"):
            async for _ in call:
                pass
    # with the right credentials the id is still checked before it becomes a path
    async with load_plane().channel(f"127.0.0.1:{stack.worker.port}") as channel:
        call = Stream(rpc.WorkerStub(channel).Train(pb.TrainRequest(job_id="../../escaped", spec_json=spec)))
        with pytest.raises(errors.InvalidRequest, match="job_id"):
            async for _ in call:
                pass
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


async def test_a_gateway_with_the_wrong_credentials_answers_503_not_401(make_stack):
    stack = await make_stack()
    app = create_app(GatewaySettings(coordinators=[f"127.0.0.1:{stack.coordinator.port}"]), plane=ROGUE)
    async with app.router.lifespan_context(app):
        import httpx

        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as http:
            r = await http.post("/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503, r.text
    assert "internal plane" in r.json()["error"]["message"]


def test_components_refuse_to_start_without_credentials(monkeypatch):
    monkeypatch.delenv("CYLLM_INTERNAL_TOKEN")
    with pytest.raises(ValueError, match="needs credentials"):
        InternalSettings()
    assert InternalSettings(insecure=True).plane().open
    with pytest.raises(ValueError, match="at least 16"):
        InternalSettings(token="short").plane()


@pytest.fixture
def pki(tmp_path):
    folder = tmp_path / "certs"
    hosts = ["localhost", "127.0.0.1"]
    for role in ("gateway", "coordinator", "worker"):
        issue(folder, role, hosts, days=1)
    for worker_id in ("w1", "evil"):
        issue(folder, "worker", hosts, days=1, worker_id=worker_id)  # worker-<id>.pem

    def plane(role: str, token: str | None = None) -> Plane:
        return InternalSettings(
            tls_ca_file=folder / "ca.pem",
            tls_cert_file=folder / f"{role}.pem",
            tls_key_file=folder / f"{role}.key",
            token=token,
        ).plane()

    return plane


async def test_a_stack_under_mutual_tls_serves_and_each_role_calls_only_its_methods(pki, tmp_path):
    coordinator = CoordinatorServer(
        CoordinatorSettings(port=0, metrics_port=None, files_dir=tmp_path / "files"), pki("coordinator")
    )
    port = await coordinator.start()
    address = f"127.0.0.1:{port}"
    worker = WorkerServer(
        WorkerSettings(
            port=0, coordinators=[address], metrics_port=None, drain_timeout_s=1, models=[fake_model()]
        ),
        pki("worker"),
    )
    await worker.start()
    try:
        await until(coordinator.scheduler.workers, timeout=5, what="the worker to register over mTLS")
        app = create_app(GatewaySettings(coordinators=[address]), plane=pki("gateway"))
        async with app.router.lifespan_context(app):
            import httpx

            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://localhost"
            ) as http:
                r = await http.post(
                    "/v1/completions", json={"model": "fake", "prompt": "hi", "max_tokens": 3}
                )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3

        # a worker's certificate may register, not generate; a gateway's the reverse
        async with pki("worker").channel(address) as channel:
            with pytest.raises(errors.Unavailable, match="a worker may not call"):
                async for _ in Stream(
                    rpc.InferenceStub(channel).Generate(pb.GenerateRequest(model="fake", prompt="hi"))
                ):
                    pass
        async with pki("gateway").channel(address) as channel:
            rogue = pb.WorkerInfo(worker_id="rogue", address="127.0.0.1:1", models=[pb.ModelInfo(id="fake")])
            await _call_refused(
                unary(rpc.WorkerPoolStub(channel).RegisterWorker, pb.RegisterWorkerRequest(worker=rogue))
            )
        # only a coordinator calls a worker
        async with pki("gateway").channel(f"127.0.0.1:{worker.port}") as channel:
            with pytest.raises(errors.Unavailable, match="a gateway may not call"):
                async for _ in Stream(
                    rpc.WorkerStub(channel).Train(pb.TrainRequest(job_id="j", spec_json="{}"))
                ):
                    pass
        # no certificate at all: the TLS handshake fails, nothing is answered
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(errors.Unreachable):
                await unary(rpc.ModelsStub(channel).ListModels, pb.ListModelsRequest(), timeout=3)
    finally:
        await worker.stop()
        await coordinator.stop()


async def test_a_worker_certificate_cannot_register_as_another_worker(pki, tmp_path):
    """Under mutual TLS a per-worker certificate binds its holder to one worker id and
    to its hosts; a role's certificate (no id) cannot take over a live worker either.
    The impersonation used to be accepted, and the real worker was never reached again."""
    coordinator = CoordinatorServer(
        CoordinatorSettings(port=0, metrics_port=None, files_dir=tmp_path / "files"), pki("coordinator")
    )
    address = f"127.0.0.1:{await coordinator.start()}"
    worker = WorkerServer(
        WorkerSettings(
            port=0,
            worker_id="w1",
            coordinators=[address],
            metrics_port=None,
            drain_timeout_s=1,
            models=[fake_model()],
        ),
        pki("worker-w1"),
    )
    await worker.start()
    try:
        real = await until(coordinator.scheduler.workers, timeout=5, what="w1 to register")
        assert real[0].record.info.address == f"127.0.0.1:{worker.port}"
        rogue_at = pb.WorkerInfo(
            worker_id="w1", address="127.0.0.1:1", models=[pb.ModelInfo(id="fake")], capacity=64
        )
        for cert, refusal in (
            ("worker-evil", "may not act as worker 'w1'"),  # another worker's
            ("worker", "alive at another address"),
        ):  # a role's, no id
            async with pki(cert).channel(address) as channel:
                with pytest.raises(errors.Forbidden, match=refusal):
                    await unary(
                        rpc.WorkerPoolStub(channel).RegisterWorker,
                        pb.RegisterWorkerRequest(worker=rogue_at),
                        timeout=5,
                    )
        async with pki("worker-evil").channel(address) as channel:
            pool = rpc.WorkerPoolStub(channel)
            with pytest.raises(errors.Forbidden):
                await unary(pool.Heartbeat, pb.HeartbeatRequest(worker_id="w1"), timeout=5)
            with pytest.raises(errors.Forbidden):
                await unary(pool.DeregisterWorker, pb.DeregisterWorkerRequest(worker_id="w1"), timeout=5)
        async with pki("worker-w1").channel(address) as channel:  # its own id, a foreign host
            elsewhere = pb.WorkerInfo(worker_id="w1", address="10.9.9.9:50051", capacity=1)
            with pytest.raises(errors.Forbidden, match="address of its certificate"):
                await unary(
                    rpc.WorkerPoolStub(channel).RegisterWorker,
                    pb.RegisterWorkerRequest(worker=elsewhere),
                    timeout=5,
                )
        (view,) = await coordinator.scheduler.workers()
        assert view.record.info.address == f"127.0.0.1:{worker.port}" and view.healthy
    finally:
        await worker.stop()
        await coordinator.stop()


async def test_the_token_cannot_take_over_a_live_workers_id(make_stack):
    stack = await make_stack()
    (real,) = await stack.coordinator.scheduler.workers()
    takeover = pb.WorkerInfo(
        worker_id=real.record.worker_id, address="127.0.0.1:1", models=[pb.ModelInfo(id="fake")], capacity=64
    )
    async with load_plane().channel(f"127.0.0.1:{stack.coordinator.port}") as channel:
        with pytest.raises(errors.Forbidden, match="alive at another address"):
            await unary(rpc.WorkerPoolStub(channel).RegisterWorker, pb.RegisterWorkerRequest(worker=takeover))
    (after,) = await stack.coordinator.scheduler.workers()
    assert after.record.info.address == real.record.info.address


async def _raw(channel: grpc.aio.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(payload, timeout=30)
    return caught.value.code(), caught.value.details()


async def test_a_call_without_the_token_is_refused_before_its_message_is_parsed(make_stack):
    """Bytes that are no protobuf message: parsed, they fail as an internal error; refused
    from the metadata alone, they never are.  (Unauthenticated 60 MB calls used to grow
    the coordinator by hundreds of MB before their refusal.)"""
    stack = await make_stack()
    garbage = b"\xff" * 64
    for plane in (ROGUE, Plane()):
        async with plane.channel(f"127.0.0.1:{stack.coordinator.port}") as channel:
            code, details = await _raw(channel, "/cyllm.v1.Inference/Generate", garbage)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
            code, _ = await _raw(channel, "/cyllm.v1.Models/ListModels", b"\x00" * (8 << 20))
            assert code == grpc.StatusCode.UNAUTHENTICATED
    async with load_plane().channel(f"127.0.0.1:{stack.coordinator.port}") as channel:
        # with the token, a message over its method's bound is refused unparsed too
        code, details = await _raw(channel, "/cyllm.v1.Models/ListModels", garbage * (1 << 15))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "over this call's limit" in details, details
        # and garbage within the bound is what parsing it gives
        code, _ = await _raw(channel, "/cyllm.v1.Models/ListModels", garbage)
        assert code != grpc.StatusCode.UNAUTHENTICATED
