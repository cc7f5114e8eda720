"""The gateway application: ``create_app(settings)``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from cyllm.gateway import console, errors
from cyllm.gateway.admin import router as admin_router
from cyllm.gateway.auth import Authenticator, AuthMiddleware
from cyllm.gateway.batch_runner import BatchRunner
from cyllm.gateway.client import Coordinator, CoordinatorClient
from cyllm.gateway.context import EdgeMiddleware
from cyllm.gateway.keys import FileKeyStore, KeyStore, RedisKeyStore
from cyllm.gateway.metrics import GatewayMetrics, MetricsMiddleware
from cyllm.gateway.metrics import router as metrics_router
from cyllm.gateway.native.registry_router import router as registry_router
from cyllm.gateway.native.router import health_router
from cyllm.gateway.native.router import router as native_router
from cyllm.gateway.native.training_router import router as training_router
from cyllm.gateway.native.usage_router import router as usage_router
from cyllm.gateway.native.websocket import router as websocket_router
from cyllm.gateway.openai.batches import router as batches_router
from cyllm.gateway.openai.embeddings import router as embeddings_router
from cyllm.gateway.openai.fine_tuning_router import router as fine_tuning_router
from cyllm.gateway.openai.responses import router as responses_router
from cyllm.gateway.openai.router import router as openai_router
from cyllm.gateway.openai.tokenize import router as tokenize_router
from cyllm.gateway.origins import BrowserGuard
from cyllm.gateway.ratelimit import RateLimiter
from cyllm.gateway.settings import GatewaySettings
from cyllm.gateway.usage import UsageRecorder
from cyllm.protocol.plane import Plane, load_plane
from cyllm.shared_state import unreachable

if TYPE_CHECKING:
    from cyllm.coordinator.settings import CoordinatorSettings


def key_store(settings: GatewaySettings) -> KeyStore:
    """Redis when configured (shared by every gateway), else the JSON file."""
    if settings.redis_url:
        from cyllm.shared_state import connect

        return RedisKeyStore(connect(settings.redis_url))
    return FileKeyStore(settings.api_keys_file)


def create_app(
    settings: GatewaySettings,
    client: CoordinatorClient | None = None,
    plane: Plane | None = None,
    coordinator_settings: CoordinatorSettings | None = None,
) -> FastAPI:
    """``coordinator_settings``: a coordinator to host in this process
    (``embedded_coordinator``), started and stopped with the app (in its event loop, which
    its gRPC server needs); the gateway then calls it in-process."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            app.state.coordinator = None
            if coordinator_settings is not None:
                from cyllm.coordinator.main import CoordinatorServer

                coordinator = CoordinatorServer(coordinator_settings, plane or load_plane())
                port = await coordinator.start()
                stack.push_async_callback(coordinator.stop)
                app.state.coordinator = coordinator
                app.state.client = client or CoordinatorClient(
                    [f"{coordinator_settings.host}:{port}"],
                    coordinator.plane,
                    settings.request_timeout_s,
                    local=Coordinator.hosted(coordinator.services, unreachable),
                )
            else:
                app.state.client = client or CoordinatorClient(
                    settings.coordinators, plane or load_plane(), settings.request_timeout_s
                )
            stack.push_async_callback(app.state.client.close)
            app.state.keys = key_store(settings)
            app.state.auth = Authenticator(settings, app.state.keys)
            app.state.limiter = RateLimiter(settings, seed=app.state.client.spent_since)
            stack.push_async_callback(app.state.limiter.close)
            app.state.usage = UsageRecorder(app.state.client.record_usage, settings.usage_report_s)
            app.state.usage.start()
            stack.push_async_callback(app.state.usage.stop)  # before the client closes
            if settings.batch_concurrency:
                runner = BatchRunner(
                    app,
                    app.state.client,
                    settings.batch_concurrency,
                    settings.batch_poll_s,
                    settings.admin_scope,
                )
                runner.start()
                stack.push_async_callback(runner.stop)
            yield

    app = _Gateway(
        title="CY-LLM Gateway",
        version="0.1.0",
        description="OpenAI-compatible and native inference API in front of the CY-LLM coordinators.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()
    errors.install(app)
    app.include_router(openai_router)
    app.include_router(responses_router)
    app.include_router(embeddings_router)
    app.include_router(tokenize_router)
    app.include_router(fine_tuning_router)
    app.include_router(batches_router)
    app.include_router(native_router)
    app.include_router(registry_router)
    app.include_router(training_router)
    app.include_router(usage_router)
    app.include_router(health_router)
    app.include_router(websocket_router)
    app.include_router(admin_router)
    app.include_router(metrics_router)
    console.install(app)
    app.add_middleware(AuthMiddleware)  # inside the edge: the context exists, no body read yet
    if settings.allowed_origins:  # their preflights answered before credentials are asked
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["*"],
        )
    app.add_middleware(
        BrowserGuard,
        bind_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
    )
    app.add_middleware(
        EdgeMiddleware, max_body_bytes=settings.max_body_bytes, max_upload_bytes=settings.max_upload_bytes
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    return app


class _Gateway(FastAPI):
    """FastAPI, serving the document ``_openapi`` makes."""

    def openapi(self) -> dict[str, Any]:
        return _openapi(self)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, less the 422 it adds to every route: validation errors here
    are 400 in OpenAI's shape (documented on each route as ``ErrorResponse``)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key (cy_...) or a JWT, when auth is enabled",
            }
        }
        schema["security"] = [{"bearer": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema
