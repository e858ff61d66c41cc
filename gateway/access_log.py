"""The access log: one line per request, built from the RequestContext once it has ended.

It never holds a credential (no headers, no query string: tokens hide there) and never a
prompt or an answer (no bodies). Strings a caller controls are length-capped; the formatter
(gateway.logging_setup) escapes them, so a crafted path cannot forge log lines.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from gateway.context import RequestContext

ACCESS_LOGGER = "gateway.access"
MAX_FIELD = 256  # paths and model names are caller input


def _cap(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_FIELD:
        return value
    return value[:MAX_FIELD] + "..."


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _iso_ms(moment: float) -> str:
    """`2026-11-25T03:04:05.678Z`; the date part is formatted once per second, not per line."""
    whole = int(moment)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((moment - whole) * 1000):03d}Z"


def access_fields(ctx: RequestContext, end: float, wall_end: float) -> dict[str, Any]:
    """The fields of one access line; `end` is perf_counter time, `wall_end` time.time()."""
    duration = end - ctx.started
    principal = ctx.principal
    usage = ctx.usage
    first_byte = ctx.first_byte_at
    return {
        "time": _iso_ms(wall_end - duration),
        "request_id": ctx.request_id,
        "client": ctx.client_ip,
        "user": principal.user if principal else None,
        "auth_method": principal.method if principal else ctx.auth_method,
        "credential": principal.credential_id if principal else None,  # a key's name, not a key
        "method": ctx.method,
        "path": _cap(ctx.path),
        "route_class": ctx.route_class,
        "route": ctx.route,  # the route-table entry matched (bounded), like the metrics label
        "model": _cap(usage.model if usage and usage.model else ctx.model),
        "status": ctx.status,
        "outcome": ctx.outcome,
        "reason": ctx.error_reason or None,
        "bytes_in": ctx.bytes_in or (len(ctx.body) if ctx.body is not None else 0),
        "bytes_out": ctx.bytes_out,
        "duration_ms": _ms(duration),
        "ttfb_ms": _ms(first_byte - ctx.started if first_byte is not None else None),
        "gateway_ms": _ms(ctx.gateway_seconds if ctx.upstream_started is not None else duration),
        "queue_ms": _ms(ctx.queue_seconds),
        "upstream": ctx.upstream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
    }


_ACCESS = logging.getLogger(ACCESS_LOGGER)


class AccessWriter(Protocol):
    def write_access(self, fields: dict[str, Any]) -> None: ...


_writer: AccessWriter | None = None


def set_access_writer(writer: AccessWriter | None) -> None:
    """`serve`'s log writer takes access lines directly (no LogRecord per request)."""
    global _writer
    _writer = writer


class AccessLog:
    """The access-log observer `create_app` registers; the formatter picks JSON or text."""

    __slots__ = ("logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or _ACCESS

    def __call__(self, ctx: RequestContext) -> None:
        if not ctx.state.config.logging.access_log or not self.logger.isEnabledFor(logging.INFO):
            return
        fields = access_fields(ctx, time.perf_counter(), time.time())
        if _writer is not None and self.logger is _ACCESS:
            _writer.write_access(fields)
            return
        self.logger.info(
            "%s %s %s",
            fields["method"],
            fields["path"],
            fields["status"],
            extra={"access": fields},
        )
