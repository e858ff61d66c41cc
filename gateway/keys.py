"""Every aiohttp AppKey / RequestKey in one place: how stages get their dependencies."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from gateway.context import RequestContext
from gateway.drain import Drain
from gateway.health_state import UpstreamUp
from gateway.limits import Limiter
from gateway.metrics import GatewayMetrics
from gateway.state import StateHolder
from gateway.upstream_client import UpstreamPool

STATE = web.AppKey("state", StateHolder)  # the current GatewayState, swapped on reload
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)  # probes (/readyz)
UPSTREAM_POOL = web.AppKey("upstream_pool", UpstreamPool)  # the relay's keep-alive connections
CONTEXT = web.RequestKey("context", RequestContext)
OBSERVERS = web.AppKey("observers", list[Callable[[RequestContext], None]])  # metrics, access log
METRICS = web.AppKey("metrics", GatewayMetrics)  # this app's series and registry
# Limit counters; outlive config reloads. (A Protocol: typed by annotation, not argument.)
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
UPSTREAM_UP = web.AppKey("upstream_up", UpstreamUp)  # last /readyz result, for metrics
DRAIN = web.AppKey("drain", Drain)  # requests in flight, for SIGTERM (set by `serve` only)
