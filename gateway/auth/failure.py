"""Why authentication failed: a fixed set of labels, and the client-facing messages.

The label goes to metrics and the access log (never user input); the message goes to the
client. Unknown user and wrong password share one message so responses do not reveal
which accounts exist.
"""

from __future__ import annotations

from typing import Final, Literal

Reason = Literal[
    "malformed",  # undecodable header, no colon, not UTF-8, too long, several values
    "unsupported_scheme",  # Authorization scheme other than Basic/Bearer
    "unknown_credentials",  # no such user / no such API key
    "bad_password",
    "expired_key",
    "invalid_token",  # bad signature, algorithm, claims, unknown kid...
    "expired_token",
    "jwks_unavailable",  # the issuer's keys could not be fetched
]

REASONS: Final[frozenset[str]] = frozenset(Reason.__args__)  # type: ignore[attr-defined]

_MESSAGES: Final[dict[str, str]] = {
    "malformed": "malformed credentials",
    "unsupported_scheme": "unsupported authorization scheme (use Basic or Bearer)",
    "unknown_credentials": "invalid credentials",
    "bad_password": "invalid credentials",  # same as unknown: no user enumeration
    "expired_key": "API key expired",
    "invalid_token": "invalid token",
    "expired_token": "token expired",
    "jwks_unavailable": "invalid token",
}


class AuthFailure(Exception):
    """Raised by the verifiers; the Authenticator turns it into a 401."""

    def __init__(self, reason: Reason, *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason: Reason = reason
        # Set when the lockout already counted this failure (a password check): the delay
        # to put on the 401. None: not counted yet (the Authenticator counts it).
        self.delay = delay

    @property
    def message(self) -> str:
        return _MESSAGES[self.reason]
