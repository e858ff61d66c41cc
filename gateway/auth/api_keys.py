"""API keys: matched by the sha256 the config holds, never stored in clear."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from gateway.auth.failure import AuthFailure
from gateway.auth.principal import Principal
from gateway.config import ApiKeyConfig


@dataclass(frozen=True, slots=True)
class _Key:
    digest: bytes
    principal: Principal
    expires: float | None  # epoch seconds


class ApiKeyTable:
    __slots__ = ("_by_digest", "_clock")

    def __init__(self, keys: tuple[ApiKeyConfig, ...], *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._by_digest: dict[bytes, _Key] = {}
        for key in keys:
            try:
                digest = bytes.fromhex(key.sha256)
            except ValueError:
                continue  # the config check reports it
            # principal.user names the `auth.users` entry whose overrides apply.
            principal = Principal(key.user or key.name, frozenset(key.roles), "api_key", key.name)
            expires = key.expires.timestamp() if key.expires else None
            self._by_digest[digest] = _Key(digest, principal, expires)

    def verify(self, key: str) -> Principal:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        entry = self._by_digest.get(digest)
        # The lookup is keyed by sha256(guess): its timing can only tell an attacker about
        # a hash they computed themselves, never about a stored key. The final comparison
        # is constant-time all the same.
        if entry is None or not hmac.compare_digest(entry.digest, digest):
            raise AuthFailure("unknown_credentials")
        if entry.expires is not None and self._clock() >= entry.expires:
            raise AuthFailure("expired_key")
        return entry.principal
