"""OpenTelemetry traces: one trace per request across the gateway, the coordinator and
the worker, exported over OTLP when the standard ``OTEL_*`` variables ask for it.

Off (the default: no ``OTEL_EXPORTER_OTLP_ENDPOINT`` nor
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or ``OTEL_SDK_DISABLED=true``, or
``OTEL_TRACES_EXPORTER=none``) nothing is installed and every helper here returns at
its first line: a request pays one test of a module flag per span it would have made.

On, each process installs the SDK's tracer provider with a batch processor (spans leave
in the background, ``OTEL_BSP_*``) and the OTLP exporter the protocol names
(``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``, the default, or ``grpc``); the
service is ``cyllm-gateway``, ``cyllm-coordinator`` or ``cyllm-worker`` unless
``OTEL_SERVICE_NAME`` says otherwise.  The context travels as W3C ``traceparent``: in an
incoming HTTP request's headers (honoured: a caller's own trace continues), in the gRPC
metadata of every gateway → coordinator call, and in ``GenerateRequest.traceparent`` to
the worker (its generations share one stream, so a call has no metadata of its own).

Spans are started and ended explicitly with their parent named (``start``/``end``,
``child``): the code they time is often an async generator, which a context variable
cannot follow across its ``yield``\\s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)
TRACEPARENT = "traceparent"
ENABLED = False
_tracer: Any = None


def wanted() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() in ("none", ""):
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service: str) -> None:
    """Install the exporter for this process's spans when the environment asks for one."""
    global ENABLED, _tracer
    if ENABLED or not wanted():
        return
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    exporter: Any
    if protocol.strip() == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

        exporter = Grpc()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        exporter = Http()
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    sampler = None  # OTEL_TRACES_SAMPLER's, when the operator names one
    if not os.environ.get("OTEL_TRACES_SAMPLER"):
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

        # Every request recorded: a caller's traceparent places the request in its trace,
        # but its "not sampled" flag does not hide the request from the operator's.
        sampler = ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))  # flushed at exit by the SDK
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("cyllm")
    ENABLED = True
    log.info("tracing: spans exported over OTLP (%s)", protocol)


def _context(parent: Any) -> Any:
    """A context from a parent: a span, a ``traceparent`` value, or None (a new trace)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if parent is None or parent == "":
        return None
    if isinstance(parent, str):
        return TraceContextTextMapPropagator().extract({TRACEPARENT: parent})
    return trace.set_span_in_context(parent)


def start(name: str, parent: Any = None, kind: str = "internal", **attributes: Any) -> Any:
    """A started span (None when tracing is off); ``kind``: internal, server or client."""
    if not ENABLED:
        return None
    from opentelemetry.trace import SpanKind

    return _tracer.start_span(
        name,
        context=_context(parent),
        kind=getattr(SpanKind, kind.upper()),
        attributes={k: v for k, v in attributes.items() if v is not None},
    )


def end(span: Any, error: str | None = None, **attributes: Any) -> None:
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    for key, value in attributes.items():
        if value is not None:
            span.set_attribute(key, value)
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


@contextlib.contextmanager
def child(parent: Any, name: str, **attributes: Any) -> Iterator[Any]:
    """A span around a block, under ``parent`` (a span or a ``traceparent``; none: no
    span, as there is no trace to add it to); an error leaving the block marks it."""
    span = start(name, parent, **attributes) if parent else None
    if span is None:
        yield None
        return
    try:
        yield span
    except BaseException as exc:
        end(span, error=type(exc).__name__)
        raise
    end(span)


def digest(name: str) -> str:
    """A stable short digest of a caller's name, for span attributes."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def traceparent(span: Any) -> str:
    """The W3C ``traceparent`` of ``span`` ('' when there is none)."""
    if span is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=_context(span))
    return carrier.get(TRACEPARENT, "")


def from_headers(headers: Mapping[str, str] | list[tuple[bytes, bytes]]) -> str:
    """The ``traceparent`` a caller sent ('' when none), from HTTP headers or gRPC metadata."""
    if not ENABLED:
        return ""
    items = headers.items() if isinstance(headers, Mapping) else headers
    for key, value in items:
        name = key.decode("latin-1") if isinstance(key, bytes) else key
        if name.lower() == TRACEPARENT:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return ""


def of_call(context: Any) -> str:
    """The ``traceparent`` in a gRPC call's metadata ('' when none, or tracing is off)."""
    return from_headers(list(context.invocation_metadata() or ())) if ENABLED else ""
