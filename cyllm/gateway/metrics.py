"""The gateway's Prometheus metrics, served on its HTTP port at ``/metrics`` and
``/actuator/prometheus`` (the path of the original design, kept for its dashboards)."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cyllm import tracing
from cyllm.gateway.context import BATCH_CALLER, TRACE, peek
from cyllm.gateway.errors import Responses
from cyllm.gateway.traffic import TrafficStats
from cyllm.gateway.usage import Usage
from cyllm.telemetry import LATENCY_BUCKETS, TOKEN_GAP_BUCKETS, CountedHistogram


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "gateway_latency_seconds",
            "HTTP request latency, to the last byte",
            ["method", "route"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Seconds from accepting a generation to its first text",
            ["model"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = CountedHistogram(
            "gateway_inter_token_latency_seconds",
            "Seconds between streamed tokens",
            "model",
            TOKEN_GAP_BUCKETS,
            r,
        )
        self.tokens = Counter("gateway_generated_tokens", "Completion tokens returned", ["model"], registry=r)
        self.traffic = TrafficStats()
        self.rejected = Counter(
            "gateway_rejected_requests",
            "Requests answered with an error status (429: queue full)",
            ["status"],
            registry=r,
        )


access_log = logging.getLogger("cyllm.gateway.access")


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (bounded labels), and
    writes one access-log record per request (health checks at DEBUG): method, route,
    status, latency, request id, caller, model and token counts — the prompt and the
    completion only when ``gateway.log_content`` is explicitly on; records the usage
    ledger's share of it; ends the request's span when tracing is on."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}
        if tracing.ENABLED:  # the request's span, under the caller's traceparent if it sent one
            span = tracing.start(
                scope["method"],
                tracing.from_headers(scope["headers"]),
                "server",
                **{"http.request.method": scope["method"]},
            )
            scope[TRACE] = span

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(method, label, str(status["code"])).inc()
            if status["code"] >= 400:
                self.metrics.rejected.labels(str(status["code"])).inc()
            ctx = peek(scope)
            identity, usage = (ctx.identity, ctx.usage) if ctx else (None, None)
            # a stream that ended in an error event was sent with 200: still a failure
            code = 500 if ctx is not None and ctx.failed else status["code"]
            if identity is not None and usage is not None:
                where = f"batch {label}" if BATCH_CALLER in scope else label
                record_usage(scope["app"], identity.subject, where, code, usage)
            # The path is the caller's: escaped, so a newline in it cannot forge a line.
            path = json.dumps(scope["path"])[1:-1]
            # Health checks (probes, cyllm serve's wait for ready) every few seconds are
            # DEBUG records, answered 503 too: at INFO they would bury the requests (an
            # outage shows in gateway_requests_total{route="/api/v1/health",status="503"}).
            access_log.log(
                logging.DEBUG if label.startswith("/api/v1/health") else logging.INFO,
                "%s %s %d %.1fms",
                method,
                path,
                status["code"],
                elapsed * 1000,
                extra={
                    "request_id": ctx.request_id if ctx else None,
                    "client_request_id": ctx.client_request_id if ctx else None,
                    "method": method,
                    "route": label,
                    "status": status["code"],
                    "latency_ms": round(elapsed * 1000, 1),
                    "caller": identity.subject if identity else None,
                    "model": usage.model if usage else None,
                    "prompt_tokens": usage.prompt_tokens if usage else None,
                    "completion_tokens": usage.completion_tokens if usage else None,
                    **((ctx.content if ctx else None) or {}),
                },
            )
            self.metrics.latency.labels(method, label).observe(elapsed)
            if (span := scope.get(TRACE)) is not None:
                span.update_name(f"{method} {label}")
                tracing.end(
                    span,
                    error=f"HTTP {code}" if code >= 500 else None,
                    **{
                        "http.route": label,
                        "http.response.status_code": status["code"],
                        "cyllm.request_id": ctx.request_id if ctx else None,
                        # a digest, as the coordinator names tenants to workers: a JWT's
                        # subject may be an e-mail address, and traces leave the cluster
                        "cyllm.caller": tracing.digest(identity.subject) if identity else None,
                        "gen_ai.request.model": usage.model if usage else None,
                        "gen_ai.usage.input_tokens": usage.prompt_tokens if usage else None,
                        "gen_ai.usage.output_tokens": usage.completion_tokens if usage else None,
                    },
                )


def record_usage(app: Any, subject: str, route: str, status: int, usage: Usage) -> None:
    """One request in the usage ledger (``usage.UsageRecorder``: added up here, reported
    in the background)."""
    recorder = getattr(app.state, "usage", None)
    if recorder is not None:
        recorder.record(time.time(), subject, route, status, usage)


router = APIRouter(tags=["metrics"])


_TEXT: Responses = {
    200: {
        "content": {"text/plain": {"schema": {"type": "string"}}},
        "description": "Prometheus text exposition",
    }
}


@router.get("/actuator/prometheus", response_class=Response, responses=_TEXT)
@router.get("/metrics", response_class=Response, responses=_TEXT)
async def prometheus(request: Request) -> Response:
    """Prometheus text exposition of the gateway's metrics (credentials needed unless
    ``metrics_public``)."""
    if not request.app.state.settings.metrics_public:
        from cyllm.gateway.auth import authenticate

        await authenticate(request)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/stats", tags=["health"])
async def stats(request: Request) -> dict:
    """This gateway's recent traffic: tokens/s, requests and TTFT p50 in 10-second
    buckets over the last 10 minutes (the console's charts).  Any caller's credentials
    (the middleware checked them)."""
    return {"bucketSeconds": 10, "buckets": request.app.state.metrics.traffic.snapshot()}
