"""The route table: ordered rules, first match wins, no match means 403. Pure logic.

Paths are compared case-insensitively on the canonical path (`paths.canonical_path`), so
`/API/PULL` gets the decision of `/api/pull` whatever the upstream does with case.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.auth.principal import Principal
from gateway.config import RouteRule

ADMIN = ("admin",)
INFERENCE_PATHS = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/audio/transcriptions",
)
READ_PATHS = ("/api/tags", "/api/ps", "/api/show", "/api/status", "/v1/models", "/v1/models/*")
MANAGEMENT_PATHS = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs/*",
)
CLOUD_PATHS = ("/api/me", "/api/signout", "/api/experimental/*", "/api/user/keys/*")
PUBLIC_PATHS = ("/", "/api/version")

# The built-in table (contract: used when `routes` is absent). Methods mirror Ollama's, so
# a known path with another method is refused here rather than answered 405 upstream.
BUILTIN_ROUTES: tuple[RouteRule, ...] = (
    RouteRule(path="/", methods=("GET", "HEAD"), public=True),
    RouteRule(path="/api/version", methods=("GET", "HEAD"), public=True),
    *(
        RouteRule(path=p, methods=("POST",), authenticated=True)
        for p in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show")
    ),
    RouteRule(path="/api/tags", methods=("GET", "HEAD"), authenticated=True),
    RouteRule(path="/api/ps", methods=("GET",), authenticated=True),
    RouteRule(path="/v1/*", methods=("GET", "POST"), authenticated=True),
    *(
        RouteRule(path=p, methods=("POST",), roles=ADMIN)
        for p in ("/api/pull", "/api/push", "/api/create", "/api/copy")
    ),
    RouteRule(path="/api/delete", methods=("DELETE",), roles=ADMIN),
    RouteRule(path="/api/blobs/*", methods=("HEAD", "POST"), roles=ADMIN),
    # Account/cloud routes act as the server's own ollama.com identity.
    RouteRule(path="/api/me", methods=("POST",), roles=ADMIN),
    RouteRule(path="/api/signout", methods=("POST",), roles=ADMIN),
    RouteRule(path="/api/experimental/*", methods=("GET", "POST"), roles=ADMIN),
    RouteRule(path="/api/user/keys/*", methods=("DELETE",), roles=ADMIN),
)


class Access(enum.Enum):
    ALLOW = "allow"
    UNAUTHENTICATED = "unauthenticated"  # credentials would help: 401
    FORBIDDEN = "forbidden"  # no credentials would help, or these lack a role: 403


def compile_glob(pattern: str) -> re.Pattern[str]:
    """`*` matches any run of characters (`/` included); everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: RouteRule
    pattern: re.Pattern[str]
    methods: frozenset[str]

    def matches(self, method: str, lowered_path: str) -> bool:
        if method not in self.methods and "*" not in self.methods:
            return False
        return self.pattern.fullmatch(lowered_path) is not None

    def access(self, principal: Principal | None) -> Access:
        rule = self.rule
        if rule.deny:
            return Access.FORBIDDEN
        if rule.public:
            return Access.ALLOW
        if principal is None:
            return Access.UNAUTHENTICATED
        if rule.authenticated or principal.roles.intersection(rule.roles or ()):
            return Access.ALLOW
        return Access.FORBIDDEN


def normalise_rule_path(path: str) -> str:
    """A rule path in the canonical spelling requests are compared with (lower, no end '/')."""
    lowered = path.lower()
    return lowered.rstrip("/") or "/"


class RouteTable:
    """Ordered rules, compiled once per config."""

    __slots__ = ("rules",)

    def __init__(self, rules: Iterable[RouteRule]) -> None:
        self.rules = tuple(
            CompiledRule(
                rule=rule,
                pattern=compile_glob(normalise_rule_path(rule.path)),
                methods=frozenset(m.upper() for m in rule.methods),
            )
            for rule in rules
        )

    def match(self, method: str, path: str) -> CompiledRule | None:
        lowered, verb = path.lower(), method.upper()
        for rule in self.rules:
            if rule.matches(verb, lowered):
                return rule
        return None

    def decide(self, method: str, path: str, principal: Principal | None) -> Access:
        rule = self.match(method, path)
        # No rule: 403 for everyone (contract). 401 would promise that credentials help.
        return Access.FORBIDDEN if rule is None else rule.access(principal)


# --- route classes: a fixed, small label set for metrics --------------------------------

ROUTE_CLASSES = ("public", "inference", "read", "management", "cloud", "gateway", "other")
_CLASSES = (
    ("public", PUBLIC_PATHS),
    ("inference", INFERENCE_PATHS),
    ("read", READ_PATHS),
    ("management", MANAGEMENT_PATHS),
    ("cloud", CLOUD_PATHS),
)
# Known endpoints by exact path (most requests), then the globbed ones, in table order.
_EXACT: dict[str, tuple[str, str]] = {
    path: (label, path) for label, paths in _CLASSES for path in paths if "*" not in path
}
_GLOBS: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (compile_glob(path), label, path) for label, paths in _CLASSES for path in paths if "*" in path
)
OTHER_ROUTE = "other"
METRICS_ROUTE = "/metrics"  # the metrics endpoint, whatever path the config gives it
GATEWAY_ROUTES = ("/healthz", "/readyz", METRICS_ROUTE)
# Every value the `route` metric label can take: a fixed set, whatever clients send.
ROUTE_LABELS = frozenset(
    (*(path for _, paths in _CLASSES for path in paths), *GATEWAY_ROUTES, OTHER_ROUTE)
)


def classify_route(path: str) -> tuple[str, str]:
    """(route class, route) of a canonical Ollama path.

    The route is the known endpoint the path matched, as written in the table
    (`/api/chat`, `/v1/models/*`, `/api/blobs/*`), or `other`: a path a client made up
    never becomes a label value of its own.
    """
    lowered = path.lower()
    exact = _EXACT.get(lowered)
    if exact is not None:
        return exact
    for pattern, label, route in _GLOBS:
        if pattern.fullmatch(lowered):
            return label, route
    return "other", OTHER_ROUTE
