"""PLACEHOLDER stage until the admission-control issue lands: everything is admitted."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler


@web.middleware
async def admit_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)
