"""Process plumbing shared by the three components: logging, signals, addresses."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


def stop_event() -> asyncio.Event:
    """An event set on SIGTERM or SIGINT (graceful shutdown)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


def advertised(host: str, port: int) -> str:
    """The address peers should dial for a server bound to ``host:port``."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"
