"""Per-server series for several upstreams: up, requests, time to first byte, failovers,
models installed and loaded. Server names come from the config: a bounded label."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.metrics import LATENCY_BUCKETS, STATUS_CLIENT_GONE, GatewayMetrics

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.upstreams.registry import Cluster


class _ClusterCollector(Collector):
    """Each server's state, read at scrape time."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ollama_gateway_upstream_server_up",
            "1 while the server answers (not marked down), by server.",
            labels=("upstream",),
        )
        cooling = GaugeMetricFamily(
            "ollama_gateway_upstream_server_cooldown",
            "1 while the server cools down after an instant 503 (its queue full).",
            labels=("upstream",),
        )
        installed = GaugeMetricFamily(
            "ollama_gateway_upstream_models",
            "Models the server lists (/api/tags), from the gateway's catalogue.",
            labels=("upstream",),
        )
        loaded = GaugeMetricFamily(
            "ollama_gateway_upstream_models_loaded",
            "Models the server has loaded (/api/ps), from the gateway's catalogue.",
            labels=("upstream",),
        )
        now = self._cluster.now()
        for name, server in self._cluster.servers.items():
            up.add_metric((name,), 1 if server.up else 0)
            cooling.add_metric((name,), 1 if server.state(now) == "cooldown" else 0)
            installed.add_metric((name,), len(server.installed))
            loaded.add_metric((name,), len(server.loaded))
        yield from (up, cooling, installed, loaded)

    def describe(self) -> Iterator[Metric]:
        return iter(())


class UpstreamMetrics:
    """Registered on the app's registry next to GatewayMetrics; `observe` is an observer."""

    def __init__(self, base: GatewayMetrics, cluster: Cluster) -> None:
        registry = base.registry
        self._base = base
        self._cluster = cluster
        self.requests = Counter(
            "ollama_gateway_upstream_requests",
            "Requests relayed to each server, by route class and status.",
            ("upstream", "route_class", "status"),
            registry=registry,
        )
        self.ttfb = Histogram(
            "ollama_gateway_upstream_server_ttfb_seconds",
            "Time from sending a request to a server to its response headers.",
            ("upstream",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.failovers = Counter(
            "ollama_gateway_upstream_failovers",
            "Requests moved to another server before any byte was answered, by the server "
            "that failed and why (refused, reset, timeout, status_503, status_404).",
            ("upstream", "reason"),
            registry=registry,
        )
        registry.register(_ClusterCollector(cluster))

    def observe(self, ctx: RequestContext) -> None:
        for failed, reason in ctx.failovers:
            if failed in self._cluster.servers:
                self._base.child(self.failovers, failed, reason[:32]).inc()
        server = ctx.upstream
        if server is None or ctx.upstream_started is None or server not in self._cluster.servers:
            return
        status = ctx.status or (STATUS_CLIENT_GONE if ctx.outcome == "client_gone" else 0)
        child = self._base.child
        child(self.requests, server, ctx.route_class, str(status)).inc()
        if ctx.first_byte_at is not None:
            child(self.ttfb, server).observe(ctx.first_byte_at - ctx.upstream_started)
