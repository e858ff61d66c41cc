"""The upstream stage: which Ollama server a request goes to (or the gateway answers itself).

- Model management (pull, push, create, copy, delete, blobs) and the server's own account
  routes go where an admin names: `X-Ollama-Upstream: NAME` or the path prefix
  `/upstreams/NAME/` (stripped by the canonical-path stage, so routes are authorised on the
  path without it). With several servers and no name: 409 listing the names. Never failed over.
- Inference and `/api/show` go to servers that list the model (`ctx.candidates`, best first:
  loaded there, then least busy; the user's last server for that model first when it has the
  model loaded); the queue stage takes a slot on one of them.
- `/api/tags`, `/v1/models`, `/api/ps`, `/api/version` are answered from the catalogues.
With one server nothing changes: every request goes to it, listings pass through.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.context import RequestContext
from gateway.errors import Conflict, GatewayError, NotFound, ServiceUnavailable, UpstreamAnswered
from gateway.keys import CLUSTER, CONTEXT, HTTP_SESSION, SCHEDULER
from gateway.policy.models import normalise_model
from gateway.scheduler.stage import SCHEDULED_PATHS
from gateway.upstreams.listings import (
    go_json,
    lowest_version,
    openai_model,
    openai_models_body,
    ps_body,
    tags_body,
)
from gateway.upstreams.registry import Cluster, Server

log = logging.getLogger("gateway.upstreams")

HEADER = "X-Ollama-Upstream"
MAX_FAILOVERS = 2  # the first server and at most two more
FAILOVER_STATUSES = frozenset({503, 404})  # Ollama's queue full; the model not there
NAMED_CLASSES = frozenset({"management", "cloud"})  # act on one server's store or identity
CHANGES_CATALOGUE = frozenset({"/api/pull", "/api/create", "/api/copy", "/api/delete"})
DOWN_RETRY_AFTER = "5"  # servers marked down are probed every few seconds
JSON = "application/json; charset=utf-8"


@web.middleware
async def upstream_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[CONTEXT]
    if ctx.route_class == "gateway":
        return await handler(request)
    cluster = request.app[CLUSTER]
    name = ctx.pinned_upstream or request.headers.get(HEADER)
    pinned = _named(cluster, name, ctx) if name is not None else None
    if ctx.route_class in NAMED_CLASSES:
        server = pinned or _only(cluster)
        ctx.upstream = server.name
        try:
            return await handler(request)
        finally:
            if ctx.path.lower() in CHANGES_CATALOGUE or ctx.path.lower().startswith("/api/blobs"):
                cluster.refresh_soon(server)
    if not cluster.several or (pinned is not None and ctx.model is None):
        ctx.upstream = (pinned or cluster.first_up()).name
        return await handler(request)
    if pinned is None and (answer := _merged_answer(request, ctx, cluster)) is not None:
        return answer
    if ctx.model is not None:
        if pinned is not None and not pinned.allows(ctx.model):
            # `models` says what is routed there; a selector header must not get around it.
            raise NotFound(f"model '{ctx.model}' not found", reason="model_not_found")
        servers = [pinned] if pinned is not None else await _servers_for(request, ctx, cluster)
        ranked = _ranked(request, ctx, servers)
        return await _with_failover(request, handler, ctx, cluster, ranked)
    ctx.upstream = cluster.first_up().name
    return await handler(request)


async def _with_failover(
    request: web.Request,
    handler: Handler,
    ctx: RequestContext,
    cluster: Cluster,
    ranked: list[Server],
) -> web.StreamResponse:
    """Run the request on the best candidates; before any byte reached the client, a server
    that refused, dropped the connection or answered an instant 503 / 'model not found' is
    skipped and the request goes to the next one (at most MAX_FAILOVERS more). Only for
    inference whose body the gateway holds: model management and uploads never fail over,
    and a stream cut midway is cut for the client, never replayed elsewhere."""
    assert ctx.model is not None
    inference = request.method == "POST" and ctx.path.lower() in SCHEDULED_PATHS
    may_fail_over = inference and ctx.body is not None and len(ranked) > 1
    remaining = list(ranked)
    while True:
        ctx.candidates = tuple(s.name for s in remaining)
        ctx.upstream = remaining[0].name
        _mark_likely_choice(request, ctx, cluster, remaining)
        last = not may_fail_over or len(remaining) == 1 or len(ctx.failovers) >= MAX_FAILOVERS
        ctx.failover_statuses = frozenset() if last else FAILOVER_STATUSES
        try:
            response = await handler(request)
        except GatewayError as error:
            if last or not error.failover:
                raise
            failed = cluster.servers[ctx.upstream]
            _note_failure(cluster, failed, error)
            ctx.failovers.append((failed.name, error.reason or "error"))
            log.warning(
                "request %s: upstream %s failed before answering (%s); trying another",
                ctx.request_id,
                failed.name,
                error.reason,
            )
            remaining = [s for s in remaining if s is not failed]
            continue
        cluster.sticky.set(ctx.user or ctx.client_ip, ctx.model, ctx.upstream)
        return response


def _note_failure(cluster: Cluster, server: Server, error: GatewayError) -> None:
    if isinstance(error, UpstreamAnswered):
        if error.upstream_status == 404:  # "model not found": its catalogue is stale
            cluster.refresh_soon(server)
        else:  # an instant 503: Ollama's queue is full
            cluster.cool_down(server)
    else:  # refused, connect timeout, reset before answering
        cluster.mark_down(server, error.reason or "unreachable")


def _mark_likely_choice(
    request: web.Request, ctx: RequestContext, cluster: Cluster, servers: list[Server]
) -> None:
    """The scheduler takes the first candidate with a free slot: mark the model as loading
    there now, so the next request of a burst prefers it instead of cold-loading elsewhere."""
    assert ctx.model is not None
    scheduler = request.app[SCHEDULER]
    for server in servers:
        used, slots = scheduler.load((server.name, ctx.model))
        if slots == 0 or used < slots:
            cluster.mark_loading(server, ctx.model)
            return


def _named(cluster: Cluster, name: str, ctx: RequestContext) -> Server:
    server = cluster.servers.get(name.strip().lower())
    if server is None:
        # The names are told to authenticated callers only (a public route may be pinned too).
        known = f" (known: {', '.join(cluster.names())})" if ctx.principal is not None else ""
        raise NotFound(f"unknown upstream {name[:64]!r}{known}", reason="upstream_name")
    return server


def _only(cluster: Cluster) -> Server:
    if cluster.several:
        names = ", ".join(cluster.names())
        raise Conflict(
            f"several upstreams: name one with {HEADER}: NAME or the path prefix "
            f"/upstreams/NAME/ ({names})",
            reason="upstream_name",
        )
    return next(iter(cluster.servers.values()))


async def _servers_for(request: web.Request, ctx: RequestContext, cluster: Cluster) -> list[Server]:
    """Servers that can serve `ctx.model`; one catalogue refresh before a 404 or 503."""
    assert ctx.model is not None
    servers = cluster.candidates(ctx.model)
    if servers:
        return servers
    await cluster.refresh_for_unknown_model(request.app[HTTP_SESSION])
    servers = cluster.candidates(ctx.model)
    if servers:
        return servers
    if cluster.anywhere(ctx.model):
        raise ServiceUnavailable(
            f"model '{ctx.model}' is only on servers that are down; retry later",
            reason="upstream_down",
            headers={"Retry-After": DOWN_RETRY_AFTER},
        )
    raise NotFound(f"model '{ctx.model}' not found", reason="model_not_found")


def _ranked(request: web.Request, ctx: RequestContext, servers: list[Server]) -> list[Server]:
    """Loaded there first, then the least busy (in flight / slots); the user's last first."""
    assert ctx.model is not None
    model = ctx.model
    scheduler = request.app[SCHEDULER]
    now = request.app[CLUSTER].now()

    def rank(server: Server) -> tuple[int, float]:
        used, slots = scheduler.load((server.name, model))
        return (0 if server.is_loaded(model, now) else 1, used / slots if slots else 0.0)

    ranks = {server.name: rank(server) for server in servers}
    ranked = sorted(servers, key=lambda server: ranks[server.name])
    last = request.app[CLUSTER].sticky.get(ctx.user or ctx.client_ip, model)
    for i, server in enumerate(ranked):  # as loaded as the best: keep to the last one
        if server.name == last and ranks[last][0] == ranks[ranked[0].name][0]:
            ranked.insert(0, ranked.pop(i))
            break
    return ranked


def _merged_answer(
    request: web.Request, ctx: RequestContext, cluster: Cluster
) -> web.Response | None:
    """Listings and the version from the catalogues; None for any other request."""
    method, path = request.method, ctx.path.lower()
    if method not in ("GET", "HEAD"):
        return None
    policy = ctx.state.policy
    allows = policy.matcher(ctx.principal).allows if policy.checks_models() else _everything
    body: bytes
    if path == "/api/tags":
        body = tags_body(cluster, allows)
    elif path == "/v1/models":
        return _reply(openai_models_body(cluster, allows), "application/json")
    elif path == "/api/ps" and method == "GET":
        body = ps_body(cluster, allows)
    elif path == "/api/version":
        version = lowest_version([s for s in cluster.servers.values() if s.up])
        if version is None:
            return None  # nothing learnt yet: ask a server
        body = go_json({"version": version})  # a server's string: never pasted into JSON
    elif path.startswith("/v1/models/") and ctx.model is not None:
        return _openai_model(ctx, cluster)
    else:
        return None
    return _reply(body, JSON)


def _everything(_name: str) -> bool:
    return True


def _openai_model(ctx: RequestContext, cluster: Cluster) -> web.Response:
    requested = ctx.path[len("/v1/models/") :]
    model = normalise_model(requested)
    for server in cluster.servers.values():
        entry = server.installed.get(model)
        if entry is not None and server.allows(model):
            body = go_json(openai_model(entry, requested))
            return _reply(body, "application/json", newline=True)
    raise NotFound(f"model '{requested[:200]}' not found", reason="model_not_found")


def _reply(body: bytes, content_type: str, *, newline: bool = False) -> web.Response:
    response = web.Response(body=body + (b"\n" if newline else b""))
    response.headers["Content-Type"] = content_type
    return response
