"""The admit stage: asks the limiter, then holds the request's slot until its last byte.

It runs after authorise, so only requests the policy allowed spend quota. Limits key on
the authenticated principal's user name; anonymous requests carry no per-principal limits.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Coroutine
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.accounting import install_accounting
from gateway.config import LimitsConfig
from gateway.context import RequestContext
from gateway.errors import ServiceUnavailable, TooManyRequests
from gateway.keys import CONTEXT, LIMITER
from gateway.limits import Limiter, StoreUnavailable
from gateway.limits.core import is_unlimited, rate_headers, retry_after_header
from gateway.limits.resolve import limits_for

STORE_DOWN_RETRY = "1"
# Lease ids must be unique across replicas sharing Redis, not secret: a random
# per-process prefix and a counter.
_LEASE_PREFIX = os.urandom(8).hex()
_lease_counter = itertools.count()


def next_lease_id() -> str:
    return f"{_LEASE_PREFIX}{next(_lease_counter):x}"


@web.middleware
async def admit_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[CONTEXT]
    principal = ctx.principal
    if principal is not None:
        config = ctx.state.config
        limits = ctx.state.memo(
            ("limits", principal.user, principal.roles), lambda: limits_for(principal, config)
        )
        if not is_unlimited(limits):
            return await _admit(request, handler, ctx, principal.user, limits)
    install_accounting(request, ctx)  # tokens are counted for metrics even when unlimited
    return await handler(request)


async def _admit(
    request: web.Request, handler: Handler, ctx: RequestContext, user: str, limits: LimitsConfig
) -> web.StreamResponse:
    limiter = request.app[LIMITER]
    # A fresh lease id per request: a client-chosen X-Request-Id could collide on purpose.
    lease = next_lease_id()
    try:
        # Keyed on the authenticated user: never on the raw credential (rotating junk
        # tokens would reset the quota) nor on X-Forwarded-For (anyone can forge it).
        decision = await limiter.admit(user, limits, lease)
    except asyncio.CancelledError:
        if limiter.remote and limits.concurrency is not None:
            _background(limiter, limiter.finish(user, lease, 0, limits))  # it may have landed
        raise
    except StoreUnavailable:
        if ctx.state.config.rate_limits.on_store_error == "allow":
            install_accounting(request, ctx)
            return await handler(request)  # fail open, as configured; nothing was taken
        raise ServiceUnavailable(
            "rate limit store unavailable",
            reason="limit_store",
            headers={"Retry-After": STORE_DOWN_RETRY},
        ) from None
    if not decision.allowed:
        # Raised, never handled here: the request stops at this stage.
        raise TooManyRequests(
            f"rate limit exceeded: {decision.limit}",
            reason=decision.limit or "",
            headers={"Retry-After": retry_after_header(decision.retry_after)},
        )
    if decision.quota is not None:
        ctx.response_headers.update(rate_headers(decision.quota))
    install_accounting(request, ctx)
    renewal = None
    if limits.concurrency is not None and limiter.lease_seconds:
        renewal = asyncio.create_task(_keep_lease(limiter, user, lease, limiter.lease_seconds))
    try:
        response = await handler(request)
        if not response.prepared and ctx.response_headers:
            response.headers.update(ctx.response_headers)
        return response
    finally:
        # Every way out passes here: done, upstream error, client gone (CancelledError).
        if renewal is not None:
            renewal.cancel()
        # A stream cut short has no final record: charge what was streamed.
        tokens = ctx.usage.total if ctx.usage is not None else ctx.streamed_tokens
        await _finish(limiter, user, lease, tokens, limits)


async def _keep_lease(limiter: Limiter, user: str, lease: str, ttl: float) -> None:
    """Renew a long stream's concurrency lease; a dead replica stops renewing."""
    while True:
        await asyncio.sleep(ttl / 3)
        await limiter.renew(user, lease)


async def _finish(
    limiter: Limiter, user: str, lease: str, tokens: int, limits: LimitsConfig
) -> None:
    if not limiter.remote:
        # Never suspends, so a second cancellation cannot cut the release in half.
        await limiter.finish(user, lease, tokens, limits)
        return
    # Shielded: if this request is cancelled again meanwhile, the release still completes.
    await asyncio.shield(_background(limiter, limiter.finish(user, lease, tokens, limits)))


def _background(limiter: Limiter, release: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run a release to its end whatever happens to the request (the limiter holds it)."""
    task = asyncio.ensure_future(release)
    limiter.background.add(task)
    task.add_done_callback(limiter.background.discard)
    return task
