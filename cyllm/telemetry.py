"""Prometheus plumbing shared by the components.

Each component owns its metrics on its own ``CollectorRegistry`` (no process-global
state, so several components can live in one test process).  The gateway serves them
on its HTTP port (``/metrics``, and ``/actuator/prometheus``, the design's path); the
coordinator and the worker speak gRPC, so they serve ``/metrics`` on a separate HTTP
port (``metrics_port``; 0 picks a free one, None turns it off).
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

# Buckets in seconds for LLM latencies: milliseconds (a cached answer) to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> tuple[WSGIServer | None, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` in a daemon thread."""
    if port is None:
        return None, 0
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise RuntimeError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror}); set metrics_port "
            "(0 picks a free port, null turns metrics off)"
        ) from None
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
