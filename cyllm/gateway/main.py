"""The gateway process (uvicorn)."""

from __future__ import annotations

import ipaddress
import logging

import uvicorn

from cyllm.gateway.app import create_app
from cyllm.gateway.settings import GatewaySettings

log = logging.getLogger("cyllm.gateway")


def serve(settings: GatewaySettings) -> None:
    if not settings.auth_enabled and not _loopback(settings.host):
        log.warning(
            "gateway bound to %s without authentication: anyone who can reach it can use it "
            "(set gateway.auth_enabled: true)", settings.host,
        )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
