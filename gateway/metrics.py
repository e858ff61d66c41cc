"""GatewayMetrics: every Prometheus series the gateway exports, on a registry it is given.

No global registry: `create_app` makes a fresh `CollectorRegistry` per app, so tests can build
many apps. Every label value comes from a bounded set (route classes and routes from the
route table, models the upstream really served, users from the config, fixed reason lists),
and each label is capped as well, so no caller can blow up cardinality by sending junk.
"""

from __future__ import annotations

import platform
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

import gateway
from gateway.policy.routes import OTHER_ROUTE, ROUTE_LABELS

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.context import RequestContext

# LLM work spans milliseconds (tags, version) to many minutes (cold loads, long generations,
# model pulls), so the buckets do too.
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
)
# What the gateway itself adds: sub-millisecond normally, up to ~1 s for a cold bcrypt check.
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
TOKENS_PER_SECOND_BUCKETS = (
    1.0,
    2.0,
    5.0,
    10.0,
    20.0,
    30.0,
    50.0,
    75.0,
    100.0,
    150.0,
    200.0,
    300.0,
    500.0,
    1000.0,
    2000.0,
)

HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
UPSTREAM_ERROR_KINDS = frozenset({"refused", "timeout", "reset"})
AUTH_METHODS = frozenset({"basic", "api_key", "jwt"})
OTHER = "other"
ANONYMOUS = "anonymous"  # no principal: public routes and rejected credentials
JWT_SUBJECT = "jwt"  # a JWT subject the config does not name (unbounded: never a label)
STATUS_CLIENT_GONE = 499  # nginx's convention for "the client closed the request"

# Caps on distinct label values; beyond them the value becomes "other".
MAX_MODELS = 200
MAX_USERS = 10_000
MAX_ROUTE_CLASSES = 100
MAX_REASONS = 50


class BoundedLabel:
    """Passes label values through until `limit` distinct ones were seen; then "other"."""

    __slots__ = ("_seen", "_limit")

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def config_users(config: GatewayConfig) -> frozenset[str]:
    """User names the config declares (Basic users and the users API keys act as)."""
    users = set(config.auth.users)
    users.update(key.user or key.name for key in config.auth.api_keys)
    return frozenset(users)


class GatewayMetrics:
    """Every series, plus `observe(ctx)`: the per-request observer `create_app` registers.

    Hooks for other parts: `config_reloads.labels(result="success"|"failure").inc()`,
    `rate_limit_store_error()`, `set_upstream_up(ok)`, `in_flight` (a Gauge).
    """

    def __init__(self, registry: CollectorRegistry, *, user_label: bool = True) -> None:
        self.registry = registry
        self.user_label = user_label
        user = ("user",) if user_label else ()
        r = registry
        self.requests = Counter(
            "ollama_gateway_requests",
            "Requests answered, by route class, route (endpoint), method and status.",
            ("route_class", "route", "method", "status", *user),
            registry=r,
        )
        self.request_duration = Histogram(
            "ollama_gateway_request_duration_seconds",
            "Time from the request's arrival to the end of its response (streams included).",
            ("route_class", "route"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "ollama_gateway_upstream_ttfb_seconds",
            "Time from sending the request upstream to the upstream's response headers.",
            ("route_class", "route"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "ollama_gateway_overhead_seconds",
            "Latency the gateway adds before a request leaves for the upstream.",
            ("route_class",),
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "ollama_gateway_requests_in_flight",
            "Requests being served now (streams included).",
            registry=r,
        )
        self.request_bytes = Counter(
            "ollama_gateway_request_bytes",
            "Request body bytes received.",
            ("route_class",),
            registry=r,
        )
        self.response_bytes = Counter(
            "ollama_gateway_response_bytes",
            "Response body bytes sent.",
            ("route_class",),
            registry=r,
        )
        self.tokens = Counter(
            "ollama_gateway_tokens",
            "Tokens the upstream reported in its final records, by model and kind.",
            (*user, "model", "kind"),
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "ollama_gateway_generation_tokens_per_second",
            "Completion tokens per second of upstream evaluation (native routes).",
            ("model",),
            buckets=TOKENS_PER_SECOND_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "ollama_gateway_auth_failures",
            "Requests refused with 401, by method and reason.",
            ("method", "reason"),
            registry=r,
        )
        self.rate_limited = Counter(
            "ollama_gateway_rate_limited",
            "Requests refused with 429, by the limit hit.",
            ("limit",),
            registry=r,
        )
        self.rate_limit_store_errors = Counter(
            "ollama_gateway_rate_limit_store_errors",
            "Failures of the rate-limit store (Redis unreachable...).",
            registry=r,
        )
        self.upstream_errors = Counter(
            "ollama_gateway_upstream_errors",
            "Upstream failures: refused, timeout, reset (also mid-stream).",
            ("kind",),
            registry=r,
        )
        self.client_disconnects = Counter(
            "ollama_gateway_client_disconnects",
            "Clients that left before their response ended.",
            ("route_class",),
            registry=r,
        )
        self.upstream_up = Gauge(
            "ollama_gateway_upstream_up",
            "1 when the last /readyz probe reached the upstream, 0 when it did not "
            "(0 before the first probe).",
            registry=r,
        )
        self.config_reloads = Counter(
            "ollama_gateway_config_reloads",
            "Config reloads by result (success, failure).",
            ("result",),
            registry=r,
        )
        self.build_info = Info("ollama_gateway_build", "Gateway build.", registry=r)
        self.build_info.info({"version": gateway.__version__, "python": platform.python_version()})
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)  # both visible at 0 from the start

        self._route_classes = BoundedLabel(MAX_ROUTE_CLASSES)
        self._models = BoundedLabel(MAX_MODELS)
        self._users = BoundedLabel(MAX_USERS)
        self._reasons = BoundedLabel(MAX_REASONS)
        self._known_users: frozenset[str] = frozenset()
        self._known_users_of: GatewayConfig | None = None
        # Label children cached per label tuple: the observer runs once per request.
        self._children: dict[tuple[Any, ...], Any] = {}

    # --- hooks for other parts ---------------------------------------------------------

    def set_upstream_up(self, ok: bool) -> None:
        self.upstream_up.set(1 if ok else 0)

    def rate_limit_store_error(self) -> None:
        self.rate_limit_store_errors.inc()

    # --- the per-request observer --------------------------------------------------------

    def child(self, metric: Any, *values: str) -> Any:
        """A labelled child of `metric`, cached: `labels()` costs microseconds per call."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def user_of(self, ctx: RequestContext) -> str:
        """The user label: only names the config declares (or fixed words), never a subject."""
        principal = ctx.principal
        if principal is None:
            return ANONYMOUS
        if principal.method == "jwt":
            config = ctx.state.config
            if config is not self._known_users_of:
                self._known_users, self._known_users_of = config_users(config), config
            if principal.user not in self._known_users:
                return JWT_SUBJECT  # subjects come from tokens: unbounded, never a label
        # Basic and API-key users exist in the config (or its htpasswd file): bounded.
        return self._users(principal.user)

    def observe(self, ctx: RequestContext) -> None:
        """Record one finished request. Reads the context only."""
        end = time.perf_counter()
        route_class = self._route_classes(ctx.route_class)
        route = ctx.route if ctx.route in ROUTE_LABELS else OTHER_ROUTE  # a fixed set
        method = ctx.method if ctx.method in HTTP_METHODS else "OTHER"
        status = ctx.status or (STATUS_CLIENT_GONE if ctx.outcome == "client_gone" else 0)
        user = self.user_of(ctx) if self.user_label else None
        labels = (route_class, route, method, str(status)) + ((user,) if user is not None else ())
        self.child(self.requests, *labels).inc()
        self.child(self.request_duration, route_class, route).observe(end - ctx.started)
        if ctx.upstream_started is not None:
            self.child(self.overhead, route_class).observe(ctx.gateway_seconds)
            if ctx.first_byte_at is not None:
                ttfb = ctx.first_byte_at - ctx.upstream_started
                self.child(self.upstream_ttfb, route_class, route).observe(ttfb)
        bytes_in = ctx.bytes_in or (len(ctx.body) if ctx.body is not None else 0)
        if bytes_in:
            self.child(self.request_bytes, route_class).inc(bytes_in)
        if ctx.bytes_out:
            self.child(self.response_bytes, route_class).inc(ctx.bytes_out)

        outcome = ctx.outcome
        if outcome == "rejected":
            if status == 401:
                auth = ctx.auth_method if ctx.auth_method in AUTH_METHODS else "none"
                reason = self._reasons(ctx.error_reason or "unknown")
                self.child(self.auth_failures, auth, reason).inc()
            elif status == 429:
                limit = self._reasons(ctx.error_reason or "unknown")
                self.child(self.rate_limited, limit).inc()
        elif outcome == "upstream_error":
            kind = ctx.error_reason if ctx.error_reason in UPSTREAM_ERROR_KINDS else OTHER
            self.child(self.upstream_errors, kind).inc()
        elif outcome == "client_gone":
            self.child(self.client_disconnects, route_class).inc()

        usage = ctx.usage
        if usage is not None and usage.model:
            # Only a model the upstream really served (its final record) becomes a label.
            model = self._models(usage.model)
            prefix = (user,) if user is not None else ()
            if usage.prompt_tokens:
                self.child(self.tokens, *prefix, model, "prompt").inc(usage.prompt_tokens)
            if usage.completion_tokens:
                self.child(self.tokens, *prefix, model, "completion").inc(usage.completion_tokens)
            if usage.eval_seconds and usage.completion_tokens:
                speed = usage.completion_tokens / usage.eval_seconds
                self.child(self.tokens_per_second, model).observe(speed)
