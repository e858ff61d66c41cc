"""Policy: everything authorisation decides, compiled once per config. Pure, no sockets.

The middleware (gateway.policy.middleware) asks it three questions: may this caller use
this route, which model globs apply to this caller, and how browsers are treated (CORS).
"""

from __future__ import annotations

from gateway.auth.principal import Principal
from gateway.config import GatewayConfig
from gateway.policy.models import ModelMatcher, models_for
from gateway.policy.origins import CorsPolicy
from gateway.policy.routes import (
    BUILTIN_ROUTES,
    METRICS_ROUTE,
    Access,
    RouteTable,
    classify_route,
)

GATEWAY_PATHS = ("/healthz", "/readyz")
_MATCHER_CACHE_SIZE = 1024


class Policy:
    """Route table, model allow-lists and CORS of one config.

    `open` is the no-credentials mode: no `auth` credentials and no `routes` configured.
    Nobody could ever authenticate, so the gateway is a plain relay (the secure-defaults
    check refuses to serve that on a non-loopback address); path canonicalisation, body
    bounds and CORS still apply.
    """

    __slots__ = ("config", "routes", "cors", "open", "metrics_path", "_matchers")

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.routes = RouteTable(config.routes if config.routes is not None else BUILTIN_ROUTES)
        self.cors = CorsPolicy.from_config(config.cors)
        self.open = config.routes is None and not config.auth.any_credentials
        metrics = config.metrics
        self.metrics_path = metrics.path.lower() if metrics.enabled else None
        self._matchers: dict[tuple[str, ...], ModelMatcher] = {}

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Policy:
        return cls(config)

    def classify_route(self, path: str) -> tuple[str, str]:
        """(route class, route): the metric labels of a canonical path, both bounded."""
        lowered = path.lower()
        if lowered in GATEWAY_PATHS:
            return "gateway", lowered
        if lowered == self.metrics_path:
            return "gateway", METRICS_ROUTE
        return classify_route(path)

    def route_access(self, method: str, path: str, principal: Principal | None) -> Access:
        """May `principal` (None: anonymous) call `method path` (a canonical path)?"""
        lowered = path.lower()
        if lowered in GATEWAY_PATHS:
            return Access.ALLOW  # liveness/readiness probes carry no credentials
        if lowered == self.metrics_path:
            return self._metrics_access(principal)
        if self.open:
            return Access.ALLOW
        return self.routes.decide(method, path, principal)

    def _metrics_access(self, principal: Principal | None) -> Access:
        metrics = self.config.metrics
        if metrics.public:
            return Access.ALLOW
        if principal is None:
            return Access.UNAUTHENTICATED
        return Access.ALLOW if principal.roles.intersection(metrics.roles) else Access.FORBIDDEN

    def checks_models(self) -> bool:
        return not self.open

    def matcher(self, principal: Principal | None) -> ModelMatcher:
        """The compiled allow-list of a caller (cached per distinct glob list)."""
        globs = models_for(principal, self.config)
        matcher = self._matchers.get(globs)
        if matcher is None:
            if len(self._matchers) >= _MATCHER_CACHE_SIZE:
                self._matchers.clear()  # bounded: JWT role sets are caller-chosen
            matcher = self._matchers[globs] = ModelMatcher.build(globs)
        return matcher

    def may_use(self, principal: Principal | None, model: str) -> bool:
        return self.open or self.matcher(principal).allows(model)
