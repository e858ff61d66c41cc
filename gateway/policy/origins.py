"""Browser CORS decisions (`cors:` config): which origins, methods and headers. Pure.

The gateway answers preflights itself: browsers send no credentials on them, and Ollama
must never see a browser's Origin (it answers 403 to foreign ones). CORS is off when
`cors.origins` is empty: every preflight is then refused (403) and no response carries
Access-Control-* headers. `Access-Control-Allow-Credentials` is never sent: callers
authenticate with explicit headers, never with ambient browser credentials.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config import CorsConfig

ALLOWED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
ALLOWED_HEADERS = frozenset(
    {
        "authorization",
        "content-type",
        "x-api-key",
        "x-request-id",
        "accept",
        "accept-language",
        "user-agent",
        "x-requested-with",
        "openai-beta",
        "openai-organization",
        "openai-project",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
    }
)
ALLOWED_HEADER_PREFIXES = ("x-stainless-",)  # the OpenAI SDK's telemetry headers
EXPOSED_HEADERS = "X-Request-Id, Retry-After, WWW-Authenticate, Server-Timing"
ORIGIN_FORMAT = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#@]+")
_ORIGIN_PATTERN = re.compile(r"\*|[a-z][a-z0-9+.-]*://[a-z0-9.*:\[\]-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


class CorsRefused(ValueError):
    """A preflight the gateway will not approve (403)."""


def origin_pattern_problem(pattern: str) -> str | None:
    """Why a configured origin is invalid, or None (used by the config check)."""
    if not _ORIGIN_PATTERN.fullmatch(pattern.lower()):
        return "must be `*` or scheme://host[:port] (a `*` may stand for part of the host)"
    return None


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    enabled: bool
    any_origin: bool
    pattern: re.Pattern[str] | None
    max_age: int

    @classmethod
    def from_config(cls, cors: CorsConfig) -> CorsPolicy:
        origins = [o.lower().rstrip("/") for o in cors.origins]
        exact = [o for o in origins if o != "*"]
        pattern = None
        if exact:
            parts = (
                "[a-z0-9-]+(?:\\.[a-z0-9-]+)*".join(re.escape(p) for p in o.split("*"))
                for o in exact
            )
            pattern = re.compile("|".join(f"(?:{p})" for p in parts))
        return cls(
            enabled=bool(origins),
            any_origin="*" in origins,
            pattern=pattern,
            max_age=cors.max_age,
        )

    def allows(self, origin: str) -> bool:
        lowered = origin.lower()
        if not self.enabled or not ORIGIN_FORMAT.fullmatch(lowered):
            return False  # "null" (sandboxed frames, file://) never matches
        if self.any_origin:
            return True
        return self.pattern is not None and self.pattern.fullmatch(lowered) is not None

    def preflight(self, origin: str, method: str, requested: str) -> dict[str, str]:
        """Headers of a 204 preflight answer; CorsRefused if the browser may not proceed."""
        if not self.enabled:
            raise CorsRefused("CORS is not enabled on this gateway")
        if not self.allows(origin):
            raise CorsRefused("origin not allowed")
        if method.upper() not in ALLOWED_METHODS:
            raise CorsRefused("method not allowed for cross-origin requests")
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ", ".join(ALLOWED_METHODS),
            "Access-Control-Max-Age": str(self.max_age),
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }
        allowed = list(_allowed_headers(requested))
        if allowed:
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed)
        return headers

    def response_headers(self, origin: str) -> dict[str, str]:
        """Headers for an actual (non-preflight) response to an allowed origin."""
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        }


def _allowed_headers(requested: str) -> Iterable[str]:
    for name in (h.strip().lower() for h in requested.split(",")):
        if not name or not _HEADER_NAME.fullmatch(name):
            continue
        if name in ALLOWED_HEADERS or name.startswith(ALLOWED_HEADER_PREFIXES):
            yield name
