"""RequestContext: what every stage learns about one request, in one place.

Stages write into it; metrics and the access log only read it. One outcome per request:
completed, rejected, upstream_error, client_gone, or shutdown (cut by SIGTERM after
`shutdown_grace`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.auth.principal import Principal
    from gateway.relay import ResponseTap
    from gateway.state import GatewayState


@dataclass(slots=True)
class Usage:
    """Token counts reported by the upstream's final record (native or OpenAI)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    eval_seconds: float | None = None  # native eval_duration, for tokens/s

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class RequestContext:
    request_id: str
    state: GatewayState  # the config this request runs under, to its end
    method: str
    path: str  # the canonical path: exactly what is authorised and forwarded
    query: str
    client_ip: str
    forwarded_for: str = ""  # the X-Forwarded-For chain to send upstream
    forwarded_proto: str = "http"  # the client's scheme (a trusted proxy's word for it)
    started: float = field(default_factory=time.perf_counter)
    route_class: str = "other"
    route: str = "other"  # the known endpoint matched (`/api/chat`, `/api/blobs/*`) or other
    principal: Principal | None = None
    auth_method: str | None = None  # method attempted (basic, api_key, jwt), even if it failed
    model: str | None = None
    body: bytes | None = None  # a bounded JSON body read for authorisation, forwarded as is
    json: Any = None  # that body parsed (a dict for JSON routes), for later stages to read
    status: int = 0
    outcome: str = "completed"
    error_reason: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_started: float | None = None
    first_byte_at: float | None = None
    usage: Usage | None = None
    streamed_tokens: int = 0  # records seen on a token stream: the charge if no usage comes
    tap: ResponseTap | None = None  # sees (and may rewrite) the response bytes on the side
    # Added to the relayed (or gateway-made) response, e.g. RateLimit-* from the admit stage.
    response_headers: dict[str, str] = field(default_factory=dict)
    gateway_seconds: float = 0.0  # time spent before the request left for the upstream
    queue_seconds: float | None = None  # time waited for a slot (scheduled routes only)
    queue_outcome: str | None = None  # dispatched, timeout, client_gone, *_queue_full
    queue_tokens: int = 0  # tokens charged to the user's fair-share counter at the end
    pinned_upstream: str | None = None  # named by the `/upstreams/NAME/` path prefix
    upstream: str | None = None  # the server this request goes to (name)
    candidates: tuple[str, ...] = ()  # servers that may serve its model, best first
    failover_statuses: frozenset[int] = frozenset()  # upstream answers that try another server
    failovers: list[tuple[str, str]] = field(default_factory=list)  # (server, reason) skipped
    # The relayed response's last byte was written: a cancellation after that (the client
    # closing at once, SIGTERM) comes too late to change the outcome.
    delivered: bool = False

    @property
    def user(self) -> str | None:
        return self.principal.user if self.principal else None
