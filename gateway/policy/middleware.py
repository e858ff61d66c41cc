"""The policy stages: canonical path, CORS, authorise (routes + models, bounded body read)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import BadRequest, Forbidden, Unauthorized
from gateway.keys import CONTEXT
from gateway.policy.body import body_model_names
from gateway.policy.cors import (
    answer_preflight,
    is_preflight,
    refuse_cross_site_ambient_credentials,
)
from gateway.policy.fields import LISTING_PATHS, body_spec, path_model
from gateway.policy.listing import SHAPES, ListingTap
from gateway.policy.models import ModelNameError, check_model_name, normalise_model
from gateway.policy.paths import (
    PathError,
    canonical_path,
    loggable_target,
    split_upstream_prefix,
)
from gateway.policy.routes import Access
from gateway.relay import add_tap

MAX_ECHO = 200  # 403 bodies name what was refused, bounded


def _echo(text: str) -> str:
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


def basic_challenge(realm: str) -> str:
    escaped = realm.replace("\\", "\\\\").replace('"', '\\"')
    return f'Basic realm="{escaped}"'


@web.middleware
async def canonical_path_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One path form for the whole pipeline: the relay forwards exactly `ctx.path`."""
    ctx = request[CONTEXT]
    if request.version < (1, 0):
        # An HTTP/0.9 request line (`GET /`): no headers, so no Host and no credentials;
        # aiohttp parses it, but it is never relayed (it used to reach Ollama's `/`).
        raise BadRequest("HTTP/1.0 or later required", reason="version", close=True)
    try:
        ctx.path = canonical_path(ctx.path)
    except PathError as exc:
        ctx.path = loggable_target(ctx.path)  # never a userinfo password in the access log
        raise BadRequest(str(exc), reason="path") from None
    ctx.path, ctx.pinned_upstream = split_upstream_prefix(ctx.path)
    ctx.route_class, ctx.route = ctx.state.policy.classify_route(ctx.path)
    return await handler(request)


@web.middleware
async def cors_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Preflights are answered here, before authentication (browsers send no credentials)."""
    cors = request[CONTEXT].state.policy.cors
    if is_preflight(request):
        return answer_preflight(request, cors)
    refuse_cross_site_ambient_credentials(request, cors)
    return await handler(request)


@web.middleware
async def authorise_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route table, then every model the request names, then listing filters."""
    ctx = request[CONTEXT]
    policy = ctx.state.policy
    method, path, principal = request.method, ctx.path, ctx.principal
    access = policy.route_access(method, path, principal)
    if access is Access.UNAUTHENTICATED:
        challenge = basic_challenge(ctx.state.config.auth.realm)
        raise Unauthorized(
            "authentication required",
            reason="no_credentials",
            headers={"WWW-Authenticate": challenge},
        )
    if access is Access.FORBIDDEN:
        raise Forbidden(f"route not allowed: {method} {_echo(path)}", reason="route")
    if ctx.route_class == "gateway":
        return await handler(request)

    names: list[str] = []
    named_in_path = path_model(path)
    if named_in_path is not None:
        names.append(named_in_path)
    spec = body_spec(method, path)
    if spec is not None and request.body_exists:
        names.extend(await body_model_names(request, ctx, spec, ctx.state.config.max_body_bytes))
    if names:
        try:
            for name in names:
                check_model_name(name)
        except ModelNameError as exc:
            raise BadRequest(str(exc), reason="model_name") from None
        ctx.model = normalise_model(names[0])
        if policy.checks_models():
            matcher = policy.matcher(principal)
            for name in names:
                if not matcher.allows(name):
                    raise Forbidden(
                        f"model not allowed: {_echo(normalise_model(name))}", reason="model"
                    )

    lowered = path.lower()
    if lowered in LISTING_PATHS and method in ("GET", "HEAD") and policy.checks_models():
        add_tap(ctx, ListingTap(SHAPES[lowered], policy.matcher(principal).allows))
    return await handler(request)
