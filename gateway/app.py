"""create_app: the one place that picks concrete parts and orders the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry

from gateway.access_log import AccessLog
from gateway.auth.lockout_metrics import count_blocks
from gateway.auth.middleware import authenticate_stage, close_authenticator
from gateway.config import DEFAULT_UPSTREAM_NAME, GatewayConfig
from gateway.errors import Forbidden
from gateway.health import healthz, readyz
from gateway.health_state import UpstreamUp
from gateway.http_server import defer_continue
from gateway.keys import (
    CLUSTER,
    CONTEXT,
    HTTP_SESSION,
    LIMITER,
    METRICS,
    OBSERVERS,
    SCHEDULER,
    STATE,
    UPSTREAM_POOL,
    UPSTREAM_POOLS,
    UPSTREAM_UP,
)
from gateway.limits import build_limiter
from gateway.limits.middleware import admit_stage
from gateway.logging_setup import server_log
from gateway.metrics import GatewayMetrics
from gateway.metrics_http import add_metrics_route, in_flight_stage
from gateway.metrics_queue import QueueMetrics
from gateway.metrics_upstreams import UpstreamMetrics
from gateway.pipeline import Observer, context_stage, errors_stage, observe_stage
from gateway.policy.cors import add_cors_headers
from gateway.policy.middleware import authorise_stage, canonical_path_stage, cors_stage
from gateway.relay import relay, upstream_headers
from gateway.scheduler import FairScheduler
from gateway.scheduler.slots import build_slot_store
from gateway.scheduler.stage import queue_stage
from gateway.state import GatewayState, StateHolder
from gateway.upstream_client import UpstreamPool
from gateway.upstreams.registry import Cluster, Timings
from gateway.upstreams.stage import upstream_stage


def build_pipeline() -> list[Middleware]:
    """The request pipeline, outermost first. The order is the security model."""
    return [
        context_stage,  # request id, client address, config snapshot; never rejects
        observe_stage,  # metrics + access log; outside `errors` so it sees rendered errors
        in_flight_stage,  # the requests-in-flight gauge, streams included
        errors_stage,  # the only place a GatewayError becomes JSON {"error": ...}
        canonical_path_stage,  # one path form, authorised and forwarded alike; else 400
        cors_stage,  # preflights answered here: browsers send no credentials on them
        authenticate_stage,  # headers -> Principal, or 401; knows nothing of routes
        authorise_stage,  # route table + model allow-lists (bounded body read) -> 403
        admit_stage,  # rate, concurrency and token budgets per principal -> 429
        upstream_stage,  # which server: named (management), by model, or merged listings
        queue_stage,  # inference waits for a slot of its model, fairly across users -> 429/503
    ]  # ... then the handler: `relay_handler`, or one of the gateway's own endpoints


async def relay_handler(request: web.Request) -> web.StreamResponse:
    ctx = request[CONTEXT]
    if ctx.route_class == "gateway":
        # A spelling of a gateway endpoint (`/HEALTHZ`, `/healthz/`) that aiohttp's router
        # did not match: the policy passed it as ours, so it must never reach Ollama.
        raise Forbidden(f"route not allowed: {request.method} {ctx.path}", reason="route")
    headers = upstream_headers(
        request.headers, ctx, forwarded_proto=ctx.forwarded_proto, forwarded_for=ctx.forwarded_for
    )
    cluster = request.app[CLUSTER]
    server = cluster.servers.get(ctx.upstream or "") or cluster.first_up()
    return await relay(request, ctx, _pool(request.app, server.name), server.config, headers)


def _pool(app: web.Application, name: str) -> UpstreamPool:
    """Each server's keep-alive connections, bounded by its own `max_connections`."""
    pools = app[UPSTREAM_POOLS]
    pool = pools.get(name)
    if pool is None:
        server = app[CLUSTER].servers[name]
        pool = pools[name] = UpstreamPool(max_connections=server.config.max_connections)
    return pool


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    config = app[STATE].current.config
    connector = aiohttp.TCPConnector(
        limit=config.upstream.max_connections, limit_per_host=0, keepalive_timeout=30
    )
    async with aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bytes pass unchanged, whatever their encoding
        timeout=aiohttp.ClientTimeout(total=None),
        # Send exactly the client's headers: aiohttp must not add its own defaults.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),  # never store upstream cookies across users
    ) as session:
        app[HTTP_SESSION] = session
        app[UPSTREAM_POOL] = UpstreamPool(max_connections=config.upstream.max_connections)
        app[UPSTREAM_POOLS] = {DEFAULT_UPSTREAM_NAME: app[UPSTREAM_POOL]}
        # Catalogues and health of several servers, learnt in the background.
        learning = asyncio.ensure_future(app[CLUSTER].run(session))
        try:
            yield
        finally:
            learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await learning
            for pool in app[UPSTREAM_POOLS].values():
                pool.close()


def _reconfigure(scheduler: FairScheduler, state: GatewayState) -> None:
    scheduler.fail_open = state.config.rate_limits.on_store_error == "allow"
    scheduler.reconfigure(state.scheduling)


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[SCHEDULER].close()  # pumps, then the shared slot store's connections
    await app[LIMITER].close()  # lets in-flight releases land, then drops Redis connections


def create_app(config: GatewayConfig, **deps: Any) -> web.Application:
    """Build the gateway. `deps` carries test doubles of external things (clock, ...)."""
    app = web.Application(
        middlewares=build_pipeline(),
        client_max_size=config.max_body_bytes,
        handler_args={
            # Request bodies reach the handler as sent: the relay forwards them with their
            # own Content-Encoding, and the policy decompresses a bounded copy itself.
            "auto_decompress": False,
            # Bounds idle connections and slow request headers (slowloris); aiohttp's own
            # default is an hour.
            "keepalive_timeout": config.client_idle_timeout,
            # Malformed requests are logged without their raw bytes (credentials).
            "logger": server_log(),
        },
    )
    app[STATE] = StateHolder(GatewayState.build(config, previous=None, **deps))
    metrics = GatewayMetrics(CollectorRegistry(), user_label=config.metrics.user_label)
    app[METRICS] = metrics  # a fresh registry per app: no global state between apps
    count_blocks(metrics.registry, app[STATE].current.authenticator.lockout)  # survives reloads
    observers: list[Observer] = [metrics.observe, AccessLog()]
    app[OBSERVERS] = observers
    app[UPSTREAM_UP] = UpstreamUp()
    app[UPSTREAM_UP].listeners.append(metrics.set_upstream_up)
    app.cleanup_ctx.append(_http_session)
    # Created once per app, not per config: counters survive reloads.
    app[LIMITER] = build_limiter(config.rate_limits, clock=deps.get("clock"))
    app[LIMITER].on_store_error.append(metrics.rate_limit_store_error)
    # Created once per app like the limiter: queues and counters survive reloads.
    # With a Redis store, the slots are shared by every replica (leases; `slot_lease`
    # seconds, injectable for tests) and `on_store_error` decides when Redis is down.
    slot_store = build_slot_store(config.rate_limits, lease_seconds=deps.get("slot_lease"))
    slot_store.on_store_error.append(metrics.rate_limit_store_error)
    app[SCHEDULER] = scheduler = FairScheduler(
        app[STATE].current.scheduling,
        store=slot_store,
        fail_open=config.rate_limits.on_store_error == "allow",
    )
    app[STATE].on_swap.append(lambda state: _reconfigure(scheduler, state))
    app[CLUSTER] = cluster = Cluster(config, timings=deps.get("upstream_timings") or Timings())
    app[STATE].on_swap.append(lambda state: cluster.reconfigure(state.config))
    observers.append(UpstreamMetrics(metrics, cluster).observe)
    observers.append(QueueMetrics(metrics, scheduler).observe)
    app.cleanup_ctx.append(_limiter)
    app.on_cleanup.append(close_authenticator)  # hashing threads + JWKS session
    app.on_response_prepare.append(add_cors_headers)  # relayed and gateway-made alike
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    add_metrics_route(app, config.metrics)  # before the catch-all; absent with metrics.listen
    # The 100 of `Expect: 100-continue` waits until the pipeline reads the body (after auth).
    app.router.add_route("*", "/{tail:.*}", relay_handler, expect_handler=defer_continue)
    return app
