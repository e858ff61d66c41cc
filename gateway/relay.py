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
from gateway.errors import (
    BadGateway,
    BadRequest,
    GatewayError,
    GatewayTimeout,
    RequestTimeout,
    UpstreamAnswered,
)
from gateway.http_server import send_continue
from gateway.upstream_client import (
    ClientBodyTimeout,
    UnsafeHeader,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)
from gateway.watchdog import Watchdog

# Methods whose requests carry no body Ollama reads: one sent anyway is refused before it
# can hold an upstream connection (anonymous slow bodies on `/api/version`).
BODYLESS_METHODS = frozenset({"GET", "HEAD"})

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
    "x-ollama-upstream",  # the gateway's own server selector
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
        if request.method in BODYLESS_METHODS:
            raise BadRequest(
                f"a {request.method} request carries no body", reason="body", close=True
            )
        data = request.content  # streamed: a 10 GB blob upload passes with flat memory
        await send_continue(request)  # the pipeline passed: now the client may send it
    ctx.upstream_started = time.perf_counter()
    # The gateway's own time: waiting in the fair queue is not overhead.
    ctx.gateway_seconds = ctx.upstream_started - ctx.started - (ctx.queue_seconds or 0.0)
    # One watchdog per request: the first byte has its own budget (cold model loads). It
    # covers waiting for a connection, pauses while a body streams up (the client's time)
    # and runs again from the moment the request is fully sent.
    watchdog = Watchdog(upstream.first_byte_timeout or upstream.read_timeout)
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
            timer=watchdog,
            body_timeout=ctx.state.config.client_body_timeout,
            send_timeout=upstream.read_timeout,
        )
        watchdog.pause()
        ctx.first_byte_at = time.perf_counter()
    except asyncio.CancelledError:
        watchdog.stop()
        if not watchdog.fired():
            raise  # the client went away: aiohttp cancelled the handler
        raise GatewayTimeout("upstream timed out", reason="timeout") from None
    except UnsafeHeader:
        watchdog.stop()
        raise BadRequest("invalid header", reason="header") from None
    except ClientBodyTimeout:
        watchdog.stop()
        raise _body_timeout() from None
    except (TimeoutError, UpstreamTimeout):  # the connect timeout; Ollama took no more body
        watchdog.stop()
        raise _before_any_byte(GatewayTimeout("upstream timed out", reason="timeout")) from None
    except UpstreamError as exc:
        watchdog.stop()
        if exc.refused:
            raise _before_any_byte(BadGateway("upstream unreachable", reason="refused")) from None
        raise _before_any_byte(
            BadGateway("upstream closed the connection", reason="reset")
        ) from None
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


def _before_any_byte(error: GatewayError) -> GatewayError:
    """Nothing of an answer came: another server may take the request (failover)."""
    error.failover = True
    return error


async def _stream_back(
    request: web.Request,
    ctx: RequestContext,
    upstream_response: UpstreamResponse,
    watchdog: Watchdog,
) -> web.StreamResponse:
    if upstream_response.status in ctx.failover_statuses:
        raise UpstreamAnswered(upstream_response.status)  # nothing was written yet
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
            watchdog.reading = False  # pause(), inlined: this loop runs once per chunk
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
    except ClientBodyTimeout:  # Ollama answered early; the upload then stalled
        return _fail_midway(request, ctx, response, prepared, "client_body_timeout", None)
    except UpstreamTimeout:
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


def _body_timeout() -> RequestTimeout:
    # The connection is closed after the answer: the rest of the body may still come.
    return RequestTimeout("request body timed out", reason="client_body_timeout", close=True)


def _fail_midway(
    request: web.Request,
    ctx: RequestContext,
    response: web.StreamResponse,
    prepared: bool,
    reason: str,
    error: type[BadGateway] | type[GatewayTimeout] | None,
) -> web.StreamResponse:
    """Upstream (or the upload) died: before any byte, a JSON error; after, cut the client.

    Writing a clean end after a broken upstream would tell the client the stream finished.
    `error` None: the client's body timed out (408; the client's fault, not upstream's).
    """
    failure: GatewayError = (
        _body_timeout()
        if error is None
        else error("upstream timed out" if reason == "timeout" else "upstream reset", reason=reason)
    )
    if not prepared:
        raise failure
    ctx.outcome = failure.outcome
    ctx.error_reason = reason
    if request.transport is not None:
        request.transport.abort()
    return response
