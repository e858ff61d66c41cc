"""The fair queue's Prometheus series: waiting requests, waits, rejections, slots, charges.

Gauges are read from the scheduler at scrape time (a custom collector: no bookkeeping on
the hot path); the wait histogram, rejections and token charges come from each request's
context when it ends. Waiting requests are counted by priority, never by user.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.metrics import LATENCY_BUCKETS, MAX_MODELS, BoundedLabel, GatewayMetrics

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.scheduler import FairScheduler

WAIT_OUTCOMES = frozenset({"dispatched", "timeout", "client_gone"})
REJECTIONS = {
    "user_queue_full": "user_queue_full",
    "queue_full": "queue_full",
    "slot_store": "slot_store",
}


class _SchedulerCollector(Collector):
    """Slots in use and capacity per (upstream, model), waiting requests per priority."""

    def __init__(self, scheduler: FairScheduler) -> None:
        self._scheduler = scheduler
        self._models = BoundedLabel(MAX_MODELS)  # model names are caller input

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily(
            "ollama_gateway_queue_waiting",
            "Requests waiting for a slot, by priority.",
            labels=("priority",),
        )
        for priority, count in sorted(self._scheduler.waiting_by_priority().items()):
            waiting.add_metric((str(priority),), count)
        in_use = GaugeMetricFamily(
            "ollama_gateway_slots_in_use",
            "Inference requests running upstream, by upstream and model.",
            labels=("upstream", "model"),
        )
        capacity = GaugeMetricFamily(
            "ollama_gateway_slots",
            "Slots (requests run at once) by upstream and model (0: no queue).",
            labels=("upstream", "model"),
        )
        totals: dict[tuple[str, str], list[int]] = {}
        for (upstream, model), used, slots in self._scheduler.slots():
            entry = totals.setdefault((upstream, self._models(model)), [0, 0])
            entry[0] += used
            entry[1] = max(entry[1], slots)
        for labels, (used, slots) in sorted(totals.items()):
            in_use.add_metric(labels, used)
            capacity.add_metric(labels, slots)
        yield waiting
        yield in_use
        yield capacity

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected on demand only


class QueueMetrics:
    """Registered next to GatewayMetrics on the same registry; `observe` is an observer."""

    def __init__(self, base: GatewayMetrics, scheduler: FairScheduler) -> None:
        self._base = base
        registry: CollectorRegistry = base.registry
        user = ("user",) if base.user_label else ()
        self.wait = Histogram(
            "ollama_gateway_queue_wait_seconds",
            "Time inference requests waited for a slot, by outcome "
            "(dispatched, timeout, client_gone).",
            ("outcome",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.rejections = Counter(
            "ollama_gateway_queue_rejections",
            "Requests the queue refused, by reason (user_queue_full, queue_full, timeout, "
            "slot_store).",
            ("reason",),
            registry=registry,
        )
        self.charged = Counter(
            "ollama_gateway_queue_tokens_charged",
            "Tokens charged to users' fair-share counters (before dividing by weight).",
            user,
            registry=registry,
        )
        for outcome in sorted(WAIT_OUTCOMES):
            self.wait.labels(outcome=outcome)
        for reason in ("user_queue_full", "queue_full", "timeout"):
            self.rejections.labels(reason=reason)
        registry.register(_SchedulerCollector(scheduler))

    def observe(self, ctx: RequestContext) -> None:
        outcome = ctx.queue_outcome
        if outcome is None:
            return
        if outcome in WAIT_OUTCOMES and ctx.queue_seconds is not None:
            self._base.child(self.wait, outcome).observe(ctx.queue_seconds)
        if outcome == "timeout" or outcome in REJECTIONS:
            self._base.child(self.rejections, outcome).inc()
        if ctx.queue_tokens:
            if self._base.user_label:
                self._base.child(self.charged, self._base.user_of(ctx)).inc(ctx.queue_tokens)
            else:
                self.charged.inc(ctx.queue_tokens)
