"""The gateway's own probes: /healthz (the process serves) and /readyz (Ollama answers)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.keys import CLUSTER, CONTEXT, HTTP_SESSION, UPSTREAM_UP
from gateway.upstreams.registry import Cluster

READY_PROBE_TIMEOUT = 5.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when Ollama answers `GET /api/version` (cheap; never a generation).

    With several servers: ready while one is up, from the cluster's own probes; the body
    gives each server's state.
    """
    cluster = request.app[CLUSTER]
    if cluster.several:
        return _cluster_readiness(cluster)
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


def _cluster_readiness(cluster: Cluster) -> web.Response:
    now = cluster.now()
    servers = {
        name: {
            "state": server.state(now),
            "models": len(server.installed),
            "loaded": sorted(server.loaded),
            "version": server.version,
            **({"reason": server.reason} if server.reason else {}),
        }
        for name, server in cluster.servers.items()
    }
    ready = any(server.up for server in cluster.servers.values())
    body = {"status": "ready" if ready else "unavailable", "upstreams": servers}
    if not ready:
        body["error"] = "no upstream available"
    return web.json_response(body, status=200 if ready else 503)
