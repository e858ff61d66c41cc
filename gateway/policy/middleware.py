"""PLACEHOLDER stages until the authorisation issue lands: everything passes."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler


@web.middleware
async def canonical_path_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


@web.middleware
async def cors_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)


@web.middleware
async def authorise_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await handler(request)
