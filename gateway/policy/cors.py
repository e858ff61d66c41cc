"""CORS in aiohttp: preflights answered here, headers added to every actual response.

Decisions live in `origins.CorsPolicy`. Headers of actual responses are added by an
`on_response_prepare` hook, because relayed responses are prepared inside the handler and
gateway-made errors outside this stage: both must carry them for a browser to read them.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import Forbidden
from gateway.keys import CONTEXT
from gateway.policy.origins import CorsPolicy, CorsRefused

# Credentials a browser attaches on its own (after a login prompt), cross-site included.
AMBIENT_SCHEMES = frozenset({"basic", "digest", "negotiate", "ntlm"})


def is_preflight(request: web.Request) -> bool:
    return (
        request.method == "OPTIONS"
        and "Origin" in request.headers
        and "Access-Control-Request-Method" in request.headers
    )


def answer_preflight(request: web.Request, cors: CorsPolicy) -> web.Response:
    """204 with the Allow-* headers, or Forbidden; never forwarded upstream."""
    try:
        headers = cors.preflight(
            request.headers["Origin"],
            request.headers["Access-Control-Request-Method"],
            request.headers.get("Access-Control-Request-Headers", ""),
        )
    except CorsRefused as exc:
        raise Forbidden(str(exc), reason="cors") from None
    return web.Response(status=204, headers=headers)


def refuse_cross_site_ambient_credentials(request: web.Request, cors: CorsPolicy) -> None:
    """Forbidden for a foreign-origin request riding on browser-held credentials.

    A page on another site can make a browser POST a form (no preflight) to the gateway
    with the Basic credentials it cached: cross-site request forgery. Script from that page
    could not have set `Authorization` itself without a preflight, so such a request is
    never legitimate.
    """
    origin = request.headers.get("Origin")
    if origin is None or cors.allows(origin):
        return
    if origin.lower() == f"{request.scheme}://{request.host}".lower():
        return  # same origin
    scheme = request.headers.get("Authorization", "").split(" ", 1)[0].lower()
    if scheme in AMBIENT_SCHEMES:
        raise Forbidden("cross-origin request refused", reason="cors")


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: Access-Control-* on actual responses to allowed origins."""
    ctx = request.get(CONTEXT)
    if ctx is None or is_preflight(request):
        return
    cors = ctx.state.policy.cors
    if not cors.enabled:
        return
    vary = response.headers.get("Vary", "")
    if "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
    origin = request.headers.get("Origin")
    if origin is not None and cors.allows(origin):
        response.headers.update(cors.response_headers(origin))
