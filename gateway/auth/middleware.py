"""The authenticate stage: headers -> Principal (or 401). It never looks at routes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.keys import CONTEXT


@web.middleware
async def authenticate_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[CONTEXT]
    ctx.principal = await ctx.state.authenticator.authenticate(request.headers, ctx.client_ip)
    return await handler(request)
