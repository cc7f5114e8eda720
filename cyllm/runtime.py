"""Process plumbing shared by the three components: logging, signals, addresses."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from datetime import datetime

# Attributes every LogRecord has; anything else was passed in ``extra=`` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 local time with milliseconds and the zone (lines from several machines
    sort and compare)."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


LOG_LEVEL_ENV = "CYLLM_LOG_LEVEL"


def setup_logging(level: str | None = None) -> None:
    """Text logs, or JSON lines when ``CYLLM_LOG_FORMAT=json``, at ``level`` (default
    ``CYLLM_LOG_LEVEL``, else INFO).  Every library logger (uvicorn's, grpc's) goes
    through this one handler: uvicorn is started without its own logging config."""
    handler = logging.StreamHandler()
    if os.environ.get("CYLLM_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True


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
