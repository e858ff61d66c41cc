"""The gateway's own probes: /healthz (the process serves) and /readyz (Ollama answers)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.keys import CONTEXT, HTTP_SESSION, UPSTREAM_UP

READY_PROBE_TIMEOUT = 5.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when Ollama answers `GET /api/version` (cheap; never a generation)."""
    upstream = request[CONTEXT].state.config.upstream
    url = upstream.url.rstrip("/") + "/api/version"
    try:
        async with asyncio.timeout(min(READY_PROBE_TIMEOUT, upstream.read_timeout)):
            async with request.app[HTTP_SESSION].get(url) as response:
                ok = response.status == 200
                await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError):
        ok = False
    request.app[UPSTREAM_UP].set(ok)
    if ok:
        return web.json_response({"status": "ready"})
    return web.json_response({"error": "upstream unavailable"}, status=503)
