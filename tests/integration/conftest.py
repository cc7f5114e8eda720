"""In-process stacks: coordinator and worker gRPC servers on real loopback sockets
(port 0), the gateway app driven through httpx's ASGI transport, a fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from cyllm.coordinator.main import CoordinatorServer
from cyllm.coordinator.settings import CoordinatorSettings
from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings
from cyllm.worker.main import WorkerServer
from cyllm.worker.settings import ModelSpec, WorkerSettings
from tests.polling import until


@dataclass
class Stack:
    coordinator: CoordinatorServer
    worker: WorkerServer
    http: httpx.AsyncClient
    app: Any = None


def fake_model(model_id: str = "fake", **kw: Any) -> ModelSpec:
    return ModelSpec(id=model_id, engine="fake", **kw)


@pytest.fixture
def hosted() -> bool:
    """Whether the gateway hosts the coordinator in its process (``embedded_coordinator``)
    rather than calling it over gRPC; a module runs its tests both ways with
    ``pytestmark = BOTH_WAYS``."""
    return False


BOTH_WAYS = pytest.mark.parametrize("hosted", [False, True], ids=["over-grpc", "hosted"])


@pytest.fixture
async def make_stack(hosted: bool) -> AsyncIterator[Any]:
    started: list[Any] = []

    async def make(
        models: list[ModelSpec] | None = None,
        metrics_port: int | None = None,
        gateway: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        **coordinator_kw: Any,
    ) -> Stack:
        async def started_app(**kw: Any) -> Any:
            app = create_app(
                GatewaySettings(**{"max_body_bytes": 4096, **kw, **(gateway or {})}),
                coordinator_settings=coordinator_settings if hosted else None,
            )
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()
            started.append(lifespan)
            return app

        coordinator_settings = CoordinatorSettings(port=0, metrics_port=metrics_port, **coordinator_kw)
        app = None
        if hosted:  # the app's lifespan starts the coordinator: the worker needs its port
            app = await started_app(embedded_coordinator="127.0.0.1:0")
            coordinator = app.state.coordinator
            cport = coordinator.port
        else:
            coordinator = CoordinatorServer(coordinator_settings)
            cport = await coordinator.start()
            started.append(coordinator)
        address = f"127.0.0.1:{cport}"
        worker = WorkerServer(
            WorkerSettings(
                port=0,
                coordinators=[address],
                drain_timeout_s=2,
                metrics_port=metrics_port,
                models=models or [fake_model()],
                **(worker or {}),
            )
        )
        await worker.start()
        started.append(worker)
        await until(coordinator.scheduler.workers, timeout=5, what="the worker to register")
        if app is None:
            app = await started_app(coordinators=[address])
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost")
        started.append(http)
        return Stack(coordinator, worker, http, app)

    yield make
    for thing in reversed(started):
        if isinstance(thing, httpx.AsyncClient):
            await thing.aclose()
        elif isinstance(thing, (WorkerServer, CoordinatorServer)):
            await thing.stop()
        else:
            await thing.__aexit__(None, None, None)
