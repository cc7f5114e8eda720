"""Process plumbing shared by the three components: logging, signals, addresses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket


# Attributes every LogRecord has; anything else was passed in ``extra=`` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    """Text logs, or JSON lines when ``CYLLM_LOG_FORMAT=json``."""
    handler = logging.StreamHandler()
    if os.environ.get("CYLLM_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


REQUEST_ID = "x-request-id"


def request_id_of(context) -> str:
    """The request id a gRPC peer sent in the metadata (empty when none)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID:
            return value
    return ""


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
