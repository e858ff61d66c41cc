"""Stdlib logging from `config.logging`: JSON or text lines on stderr, written off the loop.

Records are formatted where they are logged and written by a background thread
(QueueHandler + QueueListener): a slow stderr (a full pipe, a busy log shipper) must never
stall the event loop. `level` applies to the gateway's event logs; access lines follow
`access_log` alone, so `level: warning` keeps the access log.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

from gateway.access_log import ACCESS_LOGGER
from gateway.config import LoggingConfig

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+\-]+")
_listener: logging.handlers.QueueListener | None = None
_handler: logging.Handler | None = None


def _iso(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line; non-ASCII and control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            return json.dumps({"log": "access", **access}, separators=(",", ":"))
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    # Anything beyond plain tokens is JSON-quoted: no spaces, newlines or quotes unescaped.
    return text if _PLAIN.fullmatch(text) else json.dumps(text)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger message`; access lines as `key=value` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            pairs = " ".join(f"{k}={_text_value(v)}" for k, v in access.items() if k != "time")
            return f"{access.get('time')} INFO access {pairs}"
        line = f"{_iso(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def make_formatter(config: LoggingConfig) -> logging.Formatter:
    return JsonFormatter() if config.format == "json" else TextFormatter()


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None) -> None:
    """Install (or replace, on reload) the gateway's log handler on the root logger."""
    global _listener, _handler
    stop_logging()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    handler = logging.handlers.QueueHandler(records)
    handler.setFormatter(make_formatter(config))  # formatted here; only the write is deferred
    writer = logging.StreamHandler(stream or sys.stderr)
    writer.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(records, writer)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if config.access_log else logging.WARNING)
    listener.start()
    _listener, _handler = listener, handler


def stop_logging() -> None:
    """Flush and remove the handler `configure_logging` installed (no-op when none)."""
    global _listener, _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
    if _listener is not None:
        _listener.stop()  # writes what is still queued
    _listener = _handler = None


atexit.register(stop_logging)
