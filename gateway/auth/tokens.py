"""JWT bearer tokens, verified with pyjwt against keys and algorithms from the config only.

Defences: the token's `alg` must be one the config lists (so never `none`); a config never
mixes HS* with asymmetric algorithms (checked at load), and each family only ever gets its
own kind of key, so a public key can never be used as an HMAC secret (algorithm
confusion). `exp` is required. Time claims are checked here against the injected clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import PyJWTError

from gateway.auth.cache import VerifiedCache
from gateway.auth.failure import AuthFailure
from gateway.auth.jwks import JwksCache
from gateway.auth.principal import Principal
from gateway.auth.resources import AuthResources
from gateway.config import JWTConfig

log = logging.getLogger("gateway.auth")

HS_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS: Final = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
KNOWN_ALGORITHMS: Final = HS_ALGORITHMS | ASYMMETRIC_ALGORITHMS


def load_public_key(path: str) -> Any:
    with open(path, "rb") as file:
        return load_pem_public_key(file.read())


class JwtVerifier:
    __slots__ = (
        "_config",
        "_algorithms",
        "_secret",
        "_public_key",
        "jwks",
        "_decoder",
        "_options",
        "_clock",
        "_cache",
    )

    def __init__(
        self,
        config: JWTConfig,
        *,
        resources: AuthResources,
        clock: Callable[[], float],
        cache: VerifiedCache,
    ) -> None:
        self._config = config
        self._clock = clock
        # Verified tokens, until min(cache ttl, exp): decoding costs ~100 µs per request.
        self._cache = cache
        self._algorithms = frozenset(config.algorithms) & KNOWN_ALGORITHMS  # never "none"
        symmetric = bool(self._algorithms & HS_ALGORITHMS)
        # Each family gets only its own key kind (the loader refuses configs mixing them).
        self._secret = config.secret.reveal().encode() if symmetric and config.secret else None
        self._public_key = (
            load_public_key(config.public_key) if config.public_key and not symmetric else None
        )
        self.jwks = (
            JwksCache(
                config.jwks_url,
                cache_seconds=config.jwks_cache_seconds,
                min_refresh=config.jwks_min_refresh_seconds,
                clock=clock,
                session=resources.http_session,
            )
            if config.jwks_url and not symmetric
            else None
        )
        self._decoder = jwt.PyJWT(options={"enforce_minimum_key_length": True})
        require = ["exp"]
        if config.issuer is not None:
            require.append("iss")
        if config.audience is not None:
            require.append("aud")
        self._options: dict[str, Any] = {
            "require": require,
            "verify_exp": False,  # checked in _check_times, against the injected clock
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": config.audience is not None,
            "verify_iss": config.issuer is not None,
            "enforce_minimum_key_length": True,
        }

    async def verify(self, token: str) -> Principal:
        digest = self._cache.digest(b"jwt", token)
        principal = self._cache.get(digest)
        if principal is not None:
            return principal
        generation = self._cache.generation
        try:
            header = jwt.get_unverified_header(token)
        except PyJWTError:
            raise AuthFailure("invalid_token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise AuthFailure("invalid_token")  # `none`, or an algorithm not configured
        key = await self._key(header, alg)
        try:
            claims = self._decoder.decode(
                token,
                key=key,
                algorithms=[alg],
                options=self._options,  # type: ignore[arg-type]
                audience=self._config.audience,
                issuer=self._config.issuer,
            )
        except PyJWTError:
            raise AuthFailure("invalid_token") from None
        self._check_times(claims)
        principal = self._principal(claims)
        self._cache.put(digest, principal, generation, until=claims["exp"] + self._config.leeway)
        return principal

    async def _key(self, header: dict[str, Any], alg: str) -> Any:
        if alg in HS_ALGORITHMS:
            if self._secret is None:
                raise AuthFailure("invalid_token")
            return self._secret
        kid = header.get("kid")
        if self.jwks is not None and (kid is not None or self._public_key is None):
            return await self.jwks.key(kid, alg)
        if self._public_key is None:
            raise AuthFailure("invalid_token")
        return self._public_key

    def _check_times(self, claims: dict[str, Any]) -> None:
        now, leeway = self._clock(), self._config.leeway
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if not _is_number(exp) or (nbf is not None and not _is_number(nbf)):
            raise AuthFailure("invalid_token")
        if iat is not None and not _is_number(iat):
            raise AuthFailure("invalid_token")
        assert isinstance(exp, int | float)
        if now > exp + leeway:
            raise AuthFailure("expired_token")
        if nbf is not None and now + leeway < nbf:
            raise AuthFailure("invalid_token")  # not valid yet
        if iat is not None and now + leeway < iat:
            raise AuthFailure("invalid_token")  # issued in the future

    def _principal(self, claims: dict[str, Any]) -> Principal:
        user = _claim(claims, self._config.user_claim)
        if not isinstance(user, str) or not user:
            raise AuthFailure("invalid_token")
        roles = _claim(claims, self._config.roles_claim)
        if roles is None:
            role_set: frozenset[str] = frozenset()
        elif isinstance(roles, str):
            role_set = frozenset(roles.split())
        elif isinstance(roles, list) and all(isinstance(r, str) for r in roles):
            role_set = frozenset(roles)
        else:
            raise AuthFailure("invalid_token")
        subject = claims.get("sub")
        return Principal(user, role_set, "jwt", subject if isinstance(subject, str) else user)


def _is_number(value: Any) -> bool:
    # JSON parsers accept NaN and Infinity: either would make a token never expire.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _claim(claims: dict[str, Any], name: str) -> Any:
    """`name` as a claim, else as a dotted path (`realm_access.roles`)."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value
