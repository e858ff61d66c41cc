"""The queue stage: an inference request waits here for a slot of its model.

It runs after admit (rate limits and budgets are checked on arrival, and a waiting request
already holds its concurrency lease) and before the relay. Nothing is written to the client
before dispatch, so a request refused here gets an ordinary JSON error. The slot is held
until the handler returns: the last byte relayed, the client gone, or the upstream failed.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.context import RequestContext
from gateway.errors import GatewayError, ServiceUnavailable, TooManyRequests
from gateway.keys import CONTEXT, SCHEDULER
from gateway.policy.routes import INFERENCE_PATHS
from gateway.scheduler.core import QueueRejected, Ticket
from gateway.scheduler.estimate import estimate_tokens
from gateway.scheduler.policy import DEFAULT_UPSTREAM

# Routes that run a model on the GPU (contract: "Fair queue"): the inference routes of the
# route table, but transcriptions (whisper models are not scheduled by Ollama's slots here).
# Everything else passes without waiting.
SCHEDULED_PATHS = frozenset(INFERENCE_PATHS) - {"/v1/audio/transcriptions"}
ANONYMOUS_PREFIX = "\0address:"  # no principal: queued per client address (never a user name)


def queue_user(ctx: RequestContext) -> str:
    principal = ctx.principal
    return principal.user if principal is not None else ANONYMOUS_PREFIX + ctx.client_ip


@web.middleware
async def queue_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[CONTEXT]
    model = ctx.model
    if model is None or request.method != "POST" or ctx.path.lower() not in SCHEDULED_PATHS:
        return await handler(request)
    policy = ctx.state.scheduling
    servers = ctx.candidates or (ctx.upstream or DEFAULT_UPSTREAM,)
    keys = [(server, model) for server in servers]
    if len(keys) == 1 and policy.slots_for(keys[0]) == 0:
        return await handler(request)  # `slots: 0`: no queue at the gateway
    ticket = Ticket(
        user=queue_user(ctx),
        key=keys[0],
        alternatives=tuple(keys[1:]),  # several servers have the model: the first free slot
        estimate=estimate_tokens(ctx.path.lower(), ctx.json, len(ctx.body or b"")),
        roles=ctx.principal.roles if ctx.principal is not None else frozenset(),
    )
    queued_at = time.perf_counter()
    try:
        grant = await request.app[SCHEDULER].acquire(ticket)
    except QueueRejected as rejected:
        ctx.queue_seconds, ctx.queue_outcome = rejected.waited, rejected.reason
        raise _refusal(rejected, model) from None
    except asyncio.CancelledError:
        ctx.queue_seconds = time.perf_counter() - queued_at
        ctx.queue_outcome = "client_gone"  # Ollama never saw it
        raise
    ctx.queue_seconds, ctx.queue_outcome = grant.waited, "dispatched"
    ctx.upstream = grant.key[0]
    ctx.response_headers["Server-Timing"] = f"queue;dur={grant.waited * 1000:.2f}"
    tokens: int | None = None
    try:
        return await handler(request)
    except GatewayError:
        tokens = 0  # refused before any byte (upstream down, timeout): nothing was generated
        raise
    finally:
        # Every way out passes here, client departure (CancelledError) included.
        if tokens is None:  # Ollama's own count, else one per streamed record, else the estimate
            tokens = ctx.usage.total if ctx.usage is not None else (ctx.streamed_tokens or None)
        grant.release(tokens)
        if tokens:
            ctx.queue_tokens = tokens


def _refusal(rejected: QueueRejected, model: str) -> GatewayError:
    headers = {"Retry-After": str(rejected.retry_after)}
    if rejected.reason == "user_queue_full":
        return TooManyRequests(
            "too many of your requests are waiting for a slot; retry later",
            reason="user_queue_full",
            headers=headers,
        )
    if rejected.reason == "queue_full":
        return ServiceUnavailable(
            "the gateway's queue is full; retry later", reason="queue_full", headers=headers
        )
    if rejected.reason == "slot_store":  # Redis down and `on_store_error: deny`
        return ServiceUnavailable(
            "slot store unavailable; retry later", reason="slot_store", headers=headers
        )
    return ServiceUnavailable(
        f"waited {rejected.waited:.0f} s for a slot of model {model[:200]}; retry later",
        reason="queue_timeout",
        headers=headers,
    )
