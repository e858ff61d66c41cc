"""The authenticate stage: headers -> Principal (or 401/429). It never looks at routes.

A request without credentials passes with `ctx.principal = None`; the authorise stage
then lets it reach only routes marked `public`.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.keys import CONTEXT, STATE


@web.middleware
async def authenticate_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[CONTEXT]
    authenticator = ctx.state.authenticator
    attempt = authenticator.read_attempt(request.headers)
    if attempt is not None:
        ctx.auth_method = attempt.method  # set first: metrics count failures by method
        ctx.principal = await authenticator.verify(attempt, ctx.client_ip)
    return await handler(request)


async def close_authenticator(app: web.Application) -> None:
    """on_cleanup: threads and the JWKS session are shared by every config generation."""
    await app[STATE].current.authenticator.close()
