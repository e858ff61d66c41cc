"""The metrics endpoint, the in-flight stage and the optional separate metrics listener."""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client.exposition import choose_encoder

from gateway.auth.middleware import authenticate_stage
from gateway.config import MetricsConfig
from gateway.config_load import parse_host_port
from gateway.context import RequestContext
from gateway.errors import Forbidden, GatewayError, NotFound, Unauthorized
from gateway.http_server import GatewayRunner
from gateway.keys import CONTEXT, METRICS, OBSERVERS, STATE
from gateway.logging_setup import server_log
from gateway.pipeline import context_stage, errors_stage


def authorise_metrics(ctx: RequestContext, metrics: MetricsConfig) -> None:
    """Defence in depth next to the route policy: metrics reveal users, models and traffic."""
    if metrics.public:
        return
    principal = ctx.principal
    if principal is None:
        realm = ctx.state.config.auth.realm
        raise Unauthorized(
            "authentication required",
            reason="missing",
            headers={"WWW-Authenticate": f'Basic realm="{realm}"'},
        )
    if not principal.roles & frozenset(metrics.roles):
        raise Forbidden("not allowed to read metrics", reason="metrics_role")


async def metrics_handler(request: web.Request) -> web.Response:
    ctx = request[CONTEXT]
    authorise_metrics(ctx, ctx.state.config.metrics)
    if request.method not in ("GET", "HEAD"):  # the path is ours for every method: no relay
        raise GatewayError(
            "method not allowed", reason="method", status=405, headers={"Allow": "GET, HEAD"}
        )
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    # Off the loop: a big registry (many users x routes) takes a while to render.
    body = await asyncio.to_thread(encode, request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


@web.middleware
async def in_flight_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    gauge = request.app[METRICS].in_flight
    gauge.inc()
    try:
        return await handler(request)
    finally:
        gauge.dec()


async def metrics_elsewhere(request: web.Request) -> web.Response:
    raise NotFound("metrics are served on their own listener", reason="metrics_elsewhere")


def add_metrics_route(app: web.Application, metrics: MetricsConfig) -> None:
    """Metrics on the main listener, unless `metrics.listen` moves them: then the path is a
    404 here (never relayed to Ollama)."""
    if metrics.enabled:
        handler = metrics_handler if metrics.listen is None else metrics_elsewhere
        app.router.add_route("*", metrics.path, handler)


def create_metrics_app(main: web.Application) -> web.Application:
    """A tiny app serving only the metrics path, sharing the main app's state and registry.

    It authenticates with the same authenticator, so `public: false` still needs a role here.
    """
    config = main[STATE].current.config
    app = web.Application(
        middlewares=[context_stage, errors_stage, authenticate_stage],
        # As on the main listener: slow clients are cut off, malformed requests logged
        # without their bytes.
        handler_args={"keepalive_timeout": config.client_idle_timeout, "logger": server_log()},
    )
    app[STATE] = main[STATE]
    app[METRICS] = main[METRICS]
    app[OBSERVERS] = []
    path = main[STATE].current.config.metrics.path
    app.router.add_get(path, metrics_handler)
    return app


async def start_metrics_listener(
    main: web.Application, listen: str, ssl_context: ssl.SSLContext | None = None
) -> web.AppRunner:
    """Serve metrics on their own address; the caller cleans the runner up."""
    runner = GatewayRunner(create_metrics_app(main), access_log=None, shutdown_timeout=1)
    await runner.setup()
    host, port = parse_host_port(listen)
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner
