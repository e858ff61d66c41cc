"""The streaming proxy: bytes in, bytes out, chunk by chunk.

It knows sockets and bytes only. It forwards exactly `ctx.path` (the canonical path the
policy authorised), never buffers a body it did not have to read, and maps transport failures
to 502/504. Taps (token accounting, listing filters) see the response bytes on the side.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.context import RequestContext
from gateway.errors import BadGateway, BadRequest, GatewayTimeout
from gateway.upstream_client import UnsafeHeader, UpstreamError, UpstreamPool, UpstreamResponse

# RFC 9110 7.6.1 hop-by-hop headers, plus what must never reach Ollama:
# credentials (they would leak to ollama.com through cloud passthrough), Origin (Ollama
# answers 403 to a foreign one; CORS is ours), Host (a loopback Ollama answers 403 to a
# foreign one) and forwarding headers we rebuild ourselves (spoofing).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",
    )
)
REQUEST_DROP = HOP_BY_HOP | {
    "host",
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "origin",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
    "x-request-id",
}
RESPONSE_DROP = HOP_BY_HOP | {"content-length", "server", "date"}


class ResponseTap(Protocol):
    """Sees the upstream response on the side; may rewrite it (then `rewrites` is True).

    `feed` returns the bytes to write: the same object when nothing changes (no copy).
    """

    @property
    def rewrites(self) -> bool: ...

    def begin(self, status: int, headers: CIMultiDictProxy[str]) -> None: ...
    def feed(self, chunk: bytes) -> bytes: ...
    def end(self) -> bytes: ...


@dataclass(slots=True)
class TapChain:
    """Several taps in a row, each fed what the previous one wrote."""

    taps: list[ResponseTap]

    @property
    def rewrites(self) -> bool:
        return any(t.rewrites for t in self.taps)

    def begin(self, status: int, headers: CIMultiDictProxy[str]) -> None:
        for tap in self.taps:
            tap.begin(status, headers)

    def feed(self, chunk: bytes) -> bytes:
        for tap in self.taps:
            chunk = tap.feed(chunk)
        return chunk

    def end(self) -> bytes:
        tail = b""
        for tap in self.taps:
            tail = tap.feed(tail) + tap.end() if tail else tap.end()
        return tail


def add_tap(ctx: RequestContext, tap: ResponseTap) -> None:
    if ctx.tap is None:
        ctx.tap = tap
    elif isinstance(ctx.tap, TapChain):
        ctx.tap.taps.append(tap)
    else:
        ctx.tap = TapChain([ctx.tap, tap])


def upstream_headers(
    incoming: Mapping[str, str] | CIMultiDictProxy[str],
    ctx: RequestContext,
    *,
    forwarded_proto: str,
    forwarded_for: str,
) -> CIMultiDict[str]:
    """The request headers Ollama gets: the client's, minus credentials and hop-by-hop."""
    connection_named = {
        token.strip().lower()
        for value in incoming.getall("Connection", [])  # type: ignore[union-attr]
        for token in value.split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in REQUEST_DROP or lower in connection_named:
            continue
        headers.add(name, value)
    headers["X-Forwarded-For"] = forwarded_for
    headers["X-Forwarded-Proto"] = forwarded_proto
    headers["X-Request-Id"] = ctx.request_id
    return headers


def response_headers(upstream: CIMultiDictProxy[str], *, keep_length: bool) -> CIMultiDict[str]:
    connection_named = {
        token.strip().lower() for v in upstream.getall("Connection", []) for token in v.split(",")
    }
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in RESPONSE_DROP or lower in connection_named:
            continue
        headers.add(name, value)
    if keep_length and "Content-Length" in upstream:
        headers["Content-Length"] = upstream["Content-Length"]
    return headers


@functools.lru_cache(maxsize=16)  # parsed once per upstream URL, not once per request
def _upstream_base(url: str) -> tuple[URL, str]:
    base = URL(url)
    return base, base.raw_path.rstrip("/")  # a path prefix (Ollama behind a sub-path) is kept


async def relay(
    request: web.Request,
    ctx: RequestContext,
    pool: UpstreamPool,
    upstream: UpstreamConfig,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """Forward one request and stream the answer back; raise GatewayError before headers."""
    base, prefix = _upstream_base(upstream.url)
    target = prefix + ctx.path + (f"?{ctx.query}" if ctx.query else "")
    data: bytes | StreamReader | None = None
    if ctx.body is not None:
        data = ctx.body
    elif request.body_exists:
        data = request.content  # streamed: a 10 GB blob upload passes with flat memory
    ctx.upstream_started = time.perf_counter()
    ctx.gateway_seconds = ctx.upstream_started - ctx.started
    # One watchdog per request: the first byte has its own budget (cold model loads).
    watchdog = ReadWatchdog(upstream.first_byte_timeout or upstream.read_timeout)
    watchdog.arm()
    try:
        upstream_response = await pool.request(
            request.method,
            base,
            target,
            headers.items(),
            data,
            request.content_length,
            upstream.connect_timeout,
        )
        watchdog.reading = False
        ctx.first_byte_at = time.perf_counter()
    except asyncio.CancelledError:
        watchdog.stop()
        if not watchdog.fired():
            raise  # the client went away: aiohttp cancelled the handler
        raise GatewayTimeout("upstream timed out", reason="timeout") from None
    except UnsafeHeader:
        watchdog.stop()
        raise BadRequest("invalid header", reason="header") from None
    except TimeoutError:  # the connect timeout
        watchdog.stop()
        raise GatewayTimeout("upstream timed out", reason="timeout") from None
    except UpstreamError as exc:
        watchdog.stop()
        if exc.refused:
            raise BadGateway("upstream unreachable", reason="refused") from None
        raise BadGateway("upstream closed the connection", reason="reset") from None
    watchdog.set_timeout(upstream.read_timeout)  # later bytes: no byte for this long
    try:
        return await _stream_back(request, ctx, upstream_response, watchdog)
    finally:
        watchdog.stop()
        # On every path out (done, client gone, error) the upstream connection is released;
        # when the body was not read to the end it is closed, so Ollama stops generating.
        upstream_response.release()
        if data is request.content:
            ctx.bytes_in = request.content.total_bytes


async def _stream_back(
    request: web.Request,
    ctx: RequestContext,
    upstream_response: UpstreamResponse,
    watchdog: ReadWatchdog,
) -> web.StreamResponse:
    tap = ctx.tap
    if tap is not None:
        tap.begin(upstream_response.status, upstream_response.headers)
    rewrites = tap is not None and tap.rewrites
    response = web.StreamResponse(
        status=upstream_response.status,
        reason=upstream_response.reason,
        headers=response_headers(upstream_response.headers, keep_length=not rewrites),
    )
    response.headers["X-Request-Id"] = ctx.request_id
    if ctx.response_headers:  # the gateway's own (RateLimit-*) win over upstream's
        response.headers.update(ctx.response_headers)
    response.headers.add("Server-Timing", f"gateway;dur={ctx.gateway_seconds * 1000:.2f}")
    ctx.status = upstream_response.status
    prepared = False
    try:
        while True:
            watchdog.arm()
            chunk = await upstream_response.read_chunk()
            watchdog.reading = False
            if not chunk:
                break
            if tap is not None:
                chunk = tap.feed(chunk)
            try:
                if not prepared:
                    await response.prepare(request)
                    prepared = True
                if chunk:
                    ctx.bytes_out += len(chunk)
                    await response.write(chunk)
            except ConnectionResetError:  # the client left; `relay` closes upstream
                ctx.outcome = "client_gone"
                return response
    except asyncio.CancelledError:
        if not watchdog.fired():
            raise  # the client went away (handler cancellation): not ours to handle
        return _fail_midway(request, ctx, response, prepared, "timeout", GatewayTimeout)
    except (UpstreamError, OSError):
        return _fail_midway(request, ctx, response, prepared, "reset", BadGateway)
    tail = tap.end() if tap is not None else b""
    if not prepared:
        if rewrites and request.method != "HEAD":
            response.content_length = len(tail)  # a tap that held the whole body knows it
        await response.prepare(request)
    if tail:
        ctx.bytes_out += len(tail)
        await response.write(tail)
    await response.write_eof()
    ctx.delivered = True
    return response


class ReadWatchdog:
    """One timer per stream instead of two reschedules per chunk.

    The timer wakes at most once per `read_timeout`; it fires only when a read has been
    waiting that long (time spent writing to a slow client does not count).
    """

    __slots__ = ("reading", "timeout", "_since", "_task", "_loop", "_handle", "_fired")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.timeout = timeout
        self._fired = False
        self._since = self._loop.time()
        self.reading = False
        self._handle = self._loop.call_at(self._since + timeout, self._check)

    def arm(self) -> None:
        """A read starts waiting now."""
        self._since = self._loop.time()
        self.reading = True

    def _check(self) -> None:
        due = self._since + self.timeout
        if self.reading and self._loop.time() >= due and self._task is not None:
            self._fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at(
            due if self.reading else self._loop.time() + self.timeout, self._check
        )

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        self._handle.cancel()
        self._handle = self._loop.call_at(self._loop.time() + timeout, self._check)

    def fired(self) -> bool:
        """True when the cancellation was ours; then it is taken back (uncancel)."""
        if self._fired and self._task is not None:
            self._task.uncancel()
        return self._fired

    def stop(self) -> None:
        self._handle.cancel()


def _fail_midway(
    request: web.Request,
    ctx: RequestContext,
    response: web.StreamResponse,
    prepared: bool,
    reason: str,
    error: type[BadGateway] | type[GatewayTimeout],
) -> web.StreamResponse:
    """Upstream died: before any byte, a JSON 502/504; after, cut the client's connection.

    Writing a clean end after a broken upstream would tell the client the stream finished.
    """
    if not prepared:
        raise error(
            "upstream timed out" if reason == "timeout" else "upstream reset", reason=reason
        )
    ctx.outcome = "upstream_error"
    ctx.error_reason = reason
    if request.transport is not None:
        request.transport.abort()
    return response
