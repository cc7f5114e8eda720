"""The gateway process (uvicorn)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import uvicorn

from cyllm.gateway.app import create_app
from cyllm.gateway.auth import loopback
from cyllm.gateway.settings import GatewaySettings
from cyllm.protocol.plane import Plane

if TYPE_CHECKING:
    from cyllm.coordinator.settings import CoordinatorSettings

log = logging.getLogger("cyllm.gateway")


def serve(settings: GatewaySettings, plane: Plane, coordinator: CoordinatorSettings | None = None) -> None:
    """``coordinator``: the settings of a coordinator to host in this process."""
    if not settings.auth_enabled and not loopback(settings.host):
        log.warning(
            "gateway bound to %s without authentication: anyone who can reach it can use it, "
            "without the admin routes (set gateway.auth_enabled: true)",
            settings.host,
        )
    ssl_certfile = ssl_keyfile = None
    if settings.tls_cert_file is not None:
        ssl_certfile, ssl_keyfile = str(settings.tls_cert_file), str(settings.tls_key_file)
    config = uvicorn.Config(
        create_app(settings, plane=plane, coordinator_settings=coordinator),
        host=settings.host,
        port=settings.port,
        log_config=None,  # uvicorn's loggers go through ours (runtime.setup_logging)
        access_log=False,  # one access line per request: cyllm.gateway.access's
        timeout_graceful_shutdown=10,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        # a WebSocket message is a request: one a little over the body limit is answered
        # with an error frame (the route), one far over it ends the socket (1009)
        ws_max_size=4 * settings.max_body_bytes,
    )
    uvicorn.Server(config).run()
