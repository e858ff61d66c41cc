"""The one error type for responses the gateway makes itself.

Stages raise a `GatewayError`; only the errors middleware turns it into JSON, so every
gateway-made response has the same shape: `{"error": "..."}` plus the status's headers.
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    """A response the gateway makes itself: status, client-safe message, extra headers.

    `outcome` feeds metrics and the access log; `reason` is a short machine label
    (for example `bad_password`, `tokens_per_minute`) that never holds user input.
    `close`: the client connection is closed after the answer (a request body was left
    unread; reading on for keep-alive would let the client hold the connection).
    """

    status: int = 500
    outcome: str = "rejected"
    linger: bool = True  # with `close`: discard the unread body a while before closing
    # The upstream refused, timed out connecting, dropped the connection before any response
    # byte, or answered a status the request asked to fail over on: another server may try.
    failover: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.close = close
        self.reason = reason
        self.headers = dict(headers or {})
        if status is not None:
            self.status = status


class BadRequest(GatewayError):
    status = 400


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class RequestTimeout(GatewayError):
    """The client stopped sending its body: answered, then the connection is closed at once.

    Other refusals with `close` let aiohttp read and discard the rest of the body for a few
    seconds first (so an active sender still sees the answer); a stalled client gets none.
    """

    status = 408
    linger = False


class Conflict(GatewayError):
    """Model management with several upstreams and none named (the body lists the names)."""

    status = 409


class PayloadTooLarge(GatewayError):
    status = 413


class TooManyRequests(GatewayError):
    status = 429


class ServiceUnavailable(GatewayError):
    status = 503


class BadGateway(GatewayError):
    status = 502
    outcome = "upstream_error"


class UpstreamAnswered(GatewayError):
    """The upstream answered a status the caller fails over on (an instant 503, a 404)."""

    status = 502
    outcome = "upstream_error"
    failover = True

    def __init__(self, upstream_status: int) -> None:
        super().__init__(f"upstream answered {upstream_status}", reason=f"status_{upstream_status}")
        self.upstream_status = upstream_status


class GatewayTimeout(GatewayError):
    status = 504
    outcome = "upstream_error"
