"""The pipeline's framing stages: context, observe, errors.

The ordered list of stages lives in `gateway.app.build_pipeline`; the security stages live
with their modules (auth, policy, limits).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.client_address import forwarded_proto, resolve_client
from gateway.context import RequestContext
from gateway.drain import SHUTDOWN_OUTCOME
from gateway.errors import GatewayError
from gateway.keys import CONTEXT, DRAIN, OBSERVERS, STATE

log = logging.getLogger("gateway")

# An incoming X-Request-Id is kept only when it is short and plain (it ends up in logs).
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Observer = Callable[[RequestContext], None]


# Request ids need to be unique, not secret: a random per-process prefix and a counter
# (32 hex characters, like a uuid4) cost a fraction of uuid4() on every request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def _request_id(incoming: str | None) -> str:
    if incoming and SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


@web.middleware
async def context_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE].current
    client_ip, forwarded_for = resolve_client(
        request.remote or "", request.headers.get("X-Forwarded-For"), state.trusted_proxies
    )
    raw_path = request.raw_path.partition("?")[0]
    ctx = RequestContext(
        request_id=_request_id(request.headers.get("X-Request-Id")),
        state=state,
        method=request.method,
        path=raw_path,
        query=request.rel_url.raw_query_string,
        client_ip=client_ip,
        forwarded_for=forwarded_for,
        forwarded_proto=forwarded_proto(
            request.remote or "",
            request.headers.get("X-Forwarded-Proto"),
            request.scheme,
            state.trusted_proxies,
        ),
    )
    request[CONTEXT] = ctx
    return await handler(request)


@web.middleware
async def observe_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Feeds metrics and the access log from the context once the request has ended."""
    ctx = request[CONTEXT]
    drain = request.app.get(DRAIN)  # set by `serve`: SIGTERM waits for what it tracks
    if drain is not None:
        drain.enter(request, ctx)
    try:
        response = await handler(request)
        if not ctx.status:
            ctx.status = response.status
        if not response.prepared:  # made by the gateway itself: all of its time is ours
            elapsed_ms = (time.perf_counter() - ctx.started) * 1000
            response.headers.add("Server-Timing", f"gateway;dur={elapsed_ms:.2f}")
        return response
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client leaves, also when it leaves right after
        # the last byte while later stages still settle up (limits): that one was completed.
        if not ctx.delivered and ctx.outcome != SHUTDOWN_OUTCOME:  # else cut by SIGTERM
            ctx.outcome = "client_gone"
        raise
    finally:
        if drain is not None:
            drain.leave(ctx)
        for observe in request.app[OBSERVERS]:
            try:
                observe(ctx)
            except Exception:  # an observer must never break a request
                log.exception("observer failed (request %s)", ctx.request_id)


class _HangUpResponse(web.Response):
    """Closes the client connection once written: no lingering read of an unread body."""

    def __init__(self, protocol: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._protocol = protocol  # the connection's web.RequestHandler

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        self._protocol.force_close()  # the answer is in the socket; closing flushes it


def error_response(
    error: GatewayError, request_id: str, request: web.Request | None = None
) -> web.Response:
    body = json.dumps({"error": error.message}).encode()
    fields: dict[str, Any] = {
        "status": error.status,
        "body": body,
        "content_type": "application/json",
        "headers": error.headers,
    }
    if error.close and not error.linger and request is not None:
        response: web.Response = _HangUpResponse(request.protocol, **fields)
    else:
        response = web.Response(**fields)
    response.headers["X-Request-Id"] = request_id
    if error.close:
        response.force_close()
    return response


@web.middleware
async def errors_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The only place a GatewayError becomes a response; nothing else renders errors."""
    ctx = request[CONTEXT]
    try:
        return await handler(request)
    except GatewayError as error:
        ctx.status, ctx.outcome, ctx.error_reason = error.status, error.outcome, error.reason
        return error_response(error, ctx.request_id, request)
    except web.HTTPException as exc:  # aiohttp's own (bad method, body too large...)
        wrapped = GatewayError(exc.reason, reason="http", status=exc.status)
        ctx.status, ctx.outcome, ctx.error_reason = exc.status, "rejected", "http"
        return error_response(wrapped, ctx.request_id)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error (request %s)", ctx.request_id)
        ctx.status, ctx.outcome, ctx.error_reason = 500, "rejected", "internal"
        return error_response(GatewayError("internal error", status=500), ctx.request_id)
