"""Stdlib logging from `config.logging`: JSON or text lines on stderr, written off the loop.

Records are formatted where they are logged and written in batches by a background
thread (BatchWriter): a slow stderr (a full pipe, a busy log shipper) must never stall the
event loop. `level` applies to the gateway's event logs; access lines follow
`access_log` alone, so `level: warning` keeps the access log.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Any

from aiohttp.http_exceptions import HttpProcessingError

from gateway.access_log import ACCESS_LOGGER, set_access_writer
from gateway.config import LoggingConfig

_PLAIN = re.compile(r"[A-Za-z0-9._:/@+\-]+")
_handler: BatchWriter | None = None


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
            return self.format_access(access)
        entry: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))

    @staticmethod
    def format_access(fields: dict[str, Any]) -> str:
        return json.dumps({"log": "access", **fields}, separators=(",", ":"))


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
            return self.format_access(access)
        line = f"{_iso(record.created)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    @staticmethod
    def format_access(fields: dict[str, Any]) -> str:
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items() if k != "time")
        return f"{fields.get('time')} INFO access {pairs}"


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, minus the raw bytes of the requests its parser refuses.

    aiohttp logs such a request (bare LF line ends, a control character in a header, a
    header line over 8 KiB...) with a traceback whose message quotes the offending bytes:
    an `Authorization` line included. Only the fact, the peer and the kind of error stay.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if isinstance(error, HttpProcessingError):
            # Defends against credentials in logs: the exception's text is the raw request.
            text = str(msg) % args if args else str(msg)
            self.logger.log(
                min(level, logging.INFO),
                "%s: malformed request refused with %d (%s)",
                text,
                error.code,
                type(error).__name__,
            )
            return
        super().log(level, msg, *args, **kwargs)


def server_log() -> ServerLog:
    """The logger the app hands aiohttp's request handler (`handler_args`)."""
    return ServerLog(logging.getLogger("aiohttp.server"), {})


def make_formatter(config: LoggingConfig) -> JsonFormatter | TextFormatter:
    return JsonFormatter() if config.format == "json" else TextFormatter()


class BatchWriter(logging.Handler):
    """Formats on the caller's thread; a daemon thread writes the lines in batches.

    One wake-up per batch, not per line: at thousands of requests per second a thread
    hand-off per access line costs the event loop more than the line itself. A stderr
    that blocks (a full pipe) stalls only the writer; beyond `MAX_PENDING` lines are
    dropped and counted rather than held without bound.
    """

    MAX_PENDING = 100_000
    BATCH_SECONDS = 0.02  # how long the writer gathers lines before one write

    def __init__(self, stream: IO[str], formatter: JsonFormatter | TextFormatter) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.access_formatter = formatter
        self.stream = stream
        self.dropped = 0
        self._pending: list[str] = []
        self._wake = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:  # runs under self.lock
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._append(line)

    def write_access(self, fields: dict[str, Any]) -> None:
        """An access line without a LogRecord: the hot path, once per request."""
        line = self.access_formatter.format_access(fields)
        with self.lock:  # type: ignore[union-attr]
            self._append(line)

    def _append(self, line: str) -> None:
        if len(self._pending) >= self.MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(line)
        if len(self._pending) == 1:
            self._wake.set()

    def _run(self) -> None:
        while not self._closing:
            self._wake.wait()
            time.sleep(self.BATCH_SECONDS)
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            batch, self._pending = self._pending, []
            self._wake.clear()
        if batch:
            try:
                self.stream.write("\n".join(batch) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed at exit: nothing left to tell

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=2)
        self.flush()
        super().close()


def configure_logging(config: LoggingConfig, stream: IO[str] | None = None) -> None:
    """Install (or replace, on reload) the gateway's log handler on the root logger."""
    global _handler
    stop_logging()
    handler = BatchWriter(stream or sys.stderr, make_formatter(config))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO if config.access_log else logging.WARNING)
    _handler = handler
    set_access_writer(handler)


def stop_logging() -> None:
    """Flush and remove the handler `configure_logging` installed (no-op when none)."""
    global _handler
    set_access_writer(None)
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler.close()  # writes what is still pending
    _handler = None


atexit.register(stop_logging)
