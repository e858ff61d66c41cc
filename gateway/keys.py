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
from gateway.scheduler import FairScheduler
from gateway.state import StateHolder
from gateway.upstream_client import UpstreamPool
from gateway.upstreams.registry import Cluster

STATE = web.AppKey("state", StateHolder)  # the current GatewayState, swapped on reload
HTTP_SESSION = web.AppKey("http_session", aiohttp.ClientSession)  # probes (/readyz)
UPSTREAM_POOL = web.AppKey("upstream_pool", UpstreamPool)  # the relay's keep-alive connections
CONTEXT = web.RequestKey("context", RequestContext)
OBSERVERS = web.AppKey("observers", list[Callable[[RequestContext], None]])  # metrics, access log
METRICS = web.AppKey("metrics", GatewayMetrics)  # this app's series and registry
# Limit counters; outlive config reloads. (A Protocol: typed by annotation, not argument.)
LIMITER: web.AppKey[Limiter] = web.AppKey("limiter")
UPSTREAM_UP = web.AppKey("upstream_up", UpstreamUp)  # last /readyz result, for metrics
SCHEDULER = web.AppKey("scheduler", FairScheduler)  # slots and fair queues; outlive reloads
CLUSTER = web.AppKey("cluster", Cluster)  # every Ollama server: catalogue, health; outlives reloads
UPSTREAM_POOLS = web.AppKey("upstream_pools", dict[str, UpstreamPool])  # one per server name
DRAIN = web.AppKey("drain", Drain)  # requests in flight, for SIGTERM (set by `serve` only)
