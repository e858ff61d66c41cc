"""Reading credentials out of request headers: pure parsing, no secrets compared here."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final, Literal, NamedTuple

from multidict import CIMultiDictProxy

from gateway.auth.failure import AuthFailure

# Far above any real credential (JWTs with many claims stay under 4 KiB); bounds the work
# an attacker can make us do before anything is verified.
MAX_CREDENTIAL_CHARS: Final = 8192

AttemptMethod = Literal["basic", "api_key", "jwt", "other"]

# Three base64url segments: the compact JWS form. An API key never has this shape
# (`new-key` makes `ogw_` + base64url, no dots), so routing by shape is unambiguous.
_JWT_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# RFC 6750 b64token, plus the rest of visible ASCII: configured keys may be any printable.
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")


class Attempt(NamedTuple):
    """What the client tried. `problem` is set when the header was unusable.

    A NamedTuple rather than a frozen dataclass: built on every request, 5x cheaper.
    """

    method: AttemptMethod
    value: str = ""  # base64 user:password, API key or JWT; never logged
    problem: Literal["malformed", "unsupported_scheme"] | None = None


def read_attempt(headers: CIMultiDictProxy[str], *, jwt_enabled: bool) -> Attempt | None:
    """The credential in `headers`, or None when there is none at all."""
    auth: list[str] = headers.getall("Authorization", [])
    keys: list[str] = headers.getall("X-API-Key", [])
    if not auth and not keys:
        return None
    if len(auth) + len(keys) > 1:
        # Two credentials: proxies and the gateway might disagree on which one counts.
        method = _classify(auth[0], jwt_enabled).method if auth else "api_key"
        return Attempt(method, problem="malformed")
    if keys:
        return _bearer_attempt("api_key", keys[0])
    return _classify(auth[0], jwt_enabled)


def _classify(value: str, jwt_enabled: bool) -> Attempt:
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        payload = rest.strip()
        if not payload or len(payload) > MAX_CREDENTIAL_CHARS:
            return Attempt("basic", problem="malformed")
        return Attempt("basic", payload)
    if scheme == "bearer":
        token = rest.strip()
        method: AttemptMethod = "jwt" if jwt_enabled and _JWT_SHAPE.fullmatch(token) else "api_key"
        return _bearer_attempt(method, token)
    return Attempt("other", problem="unsupported_scheme")


def _bearer_attempt(method: AttemptMethod, token: str) -> Attempt:
    token = token.strip()
    if not token or len(token) > MAX_CREDENTIAL_CHARS or not _TOKEN_CHARS.fullmatch(token):
        return Attempt(method, problem="malformed")
    return Attempt(method, token)


def decode_basic(payload: str) -> tuple[str, str]:
    """base64(user:password) -> (user, password). The password may contain colons."""
    try:
        raw = base64.b64decode(payload, validate=True)  # strict: no silently dropped junk
        text = raw.decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise AuthFailure("malformed") from None
    user, colon, password = text.partition(":")  # RFC 7617: user names have no colon
    if not colon or not user:
        raise AuthFailure("malformed")
    return user, password
