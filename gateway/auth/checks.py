"""Semantic checks of `auth:`, registered with the config loader.

Imported at the bottom of `gateway.config_load`, so every load (serve, reload, `check`)
runs them. Messages never repeat a secret or a hash.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.auth import hashes
from gateway.auth.htpasswd import read_htpasswd
from gateway.auth.tokens import (
    ASYMMETRIC_ALGORITHMS,
    HS_ALGORITHMS,
    KNOWN_ALGORITHMS,
    load_public_key,
)
from gateway.config import GatewayConfig, JWTConfig
from gateway.config_load import Problem, is_loopback_host, register_check

MIN_HS_SECRET_BYTES: Final = 32
MAX_LISTED_PROBLEMS: Final = 5
_SHA256_HEX: Final = re.compile(r"[0-9a-fA-F]{64}")


@register_check
def check_auth(config: GatewayConfig) -> Iterable[Problem]:
    yield from _check_users(config)
    yield from _check_htpasswd(config)
    yield from _check_api_keys(config)
    if config.auth.jwt is not None:
        yield from _check_jwt(config.auth.jwt)
    yield from _check_lockout(config)


def _check_lockout(config: GatewayConfig) -> Iterator[Problem]:
    lockout = config.auth.lockout
    if lockout.max_failures <= 0:
        return  # off: its other keys are never used, so never judged
    for key in ("window", "block_seconds", "max_tracked"):
        if getattr(lockout, key) <= 0:
            yield Problem(f"auth.lockout.{key}", "must be greater than 0")
    ceiling = lockout.address_max_failures
    if ceiling is not None and ceiling < lockout.max_failures:
        yield Problem(
            "auth.lockout.address_max_failures",
            "must be at least max_failures (an address carries many users)",
        )


def _check_users(config: GatewayConfig) -> Iterator[Problem]:
    for name, user in config.auth.users.items():
        if user is None:  # failed to convert: already reported
            continue
        if not name or ":" in name:
            # Basic sends user:password; a colon in the name can never be sent.
            yield Problem(f"auth.users.{name}", "a user name must be non-empty and without ':'")
        refusal = hashes.refusal(user.password.reveal())
        if refusal:
            yield Problem(f"auth.users.{name}.password", refusal)


def _check_htpasswd(config: GatewayConfig) -> Iterator[Problem]:
    path = config.auth.htpasswd
    if not path:
        return
    if not os.path.isfile(path):
        yield Problem("auth.htpasswd", f"file not found: {path}")
        return
    problems = read_htpasswd(path).problems
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = len(problems) - MAX_LISTED_PROBLEMS
        yield Problem("auth.htpasswd", listed + (f"; and {more} more" if more > 0 else ""))


def _check_api_keys(config: GatewayConfig) -> Iterator[Problem]:
    names: set[str] = set()
    digests: set[str] = set()
    for i, key in enumerate(config.auth.api_keys):
        if key is None:
            continue
        path = f"auth.api_keys[{i}]"
        if not key.name:
            yield Problem(f"{path}.name", "must not be empty")
        elif key.name in names:
            yield Problem(f"{path}.name", f"{key.name!r} is used by another key")
        names.add(key.name)
        if not _SHA256_HEX.fullmatch(key.sha256):
            yield Problem(
                f"{path}.sha256",
                "must be 64 hex characters: the sha256 of the key, never the key itself "
                "(`ollama-gateway new-key` prints it)",
            )
        elif key.sha256.lower() in digests:
            yield Problem(f"{path}.sha256", "the same key is listed twice")
        digests.add(key.sha256.lower())


def _check_jwt(jwt: JWTConfig) -> Iterator[Problem]:
    algorithms = set(jwt.algorithms)
    if not algorithms:
        yield Problem("auth.jwt.algorithms", "list at least one algorithm")
    for i, alg in enumerate(jwt.algorithms):
        if alg.lower() == "none":
            yield Problem(f"auth.jwt.algorithms[{i}]", '"none" is never accepted (unsigned tokens)')
        elif alg not in KNOWN_ALGORITHMS:
            known = ", ".join(sorted(KNOWN_ALGORITHMS))
            yield Problem(
                f"auth.jwt.algorithms[{i}]", f"unknown algorithm {alg!r} (known: {known})"
            )
    symmetric = algorithms & HS_ALGORITHMS
    asymmetric = algorithms & ASYMMETRIC_ALGORITHMS
    if symmetric and asymmetric:
        yield Problem(
            "auth.jwt.algorithms",
            "mixes HS* with asymmetric algorithms: a public key could then be taken for an "
            "HMAC secret (algorithm confusion); accept one family only",
        )
        return
    if symmetric:
        yield from _check_symmetric(jwt)
    elif asymmetric:
        yield from _check_asymmetric(jwt, asymmetric)
    if not jwt.user_claim:
        yield Problem("auth.jwt.user_claim", "must not be empty")


def _check_symmetric(jwt: JWTConfig) -> Iterator[Problem]:
    if jwt.secret is None or not jwt.secret.reveal():
        yield Problem("auth.jwt.secret", "is required for HS* algorithms")
    elif len(jwt.secret.reveal().encode()) < MIN_HS_SECRET_BYTES:
        yield Problem(
            "auth.jwt.secret",
            f"must be at least {MIN_HS_SECRET_BYTES} bytes (try `openssl rand -base64 48`)",
        )
    for key in ("public_key", "jwks_url"):
        if getattr(jwt, key):
            yield Problem(f"auth.jwt.{key}", "is only used with RS*/PS*/ES*/EdDSA algorithms")
    if jwt.private_key:
        yield Problem("auth.jwt.private_key", "is only used with RS*/PS*/ES*/EdDSA algorithms")


def _check_asymmetric(jwt: JWTConfig, algorithms: set[str]) -> Iterator[Problem]:
    if jwt.secret is not None:
        yield Problem(
            "auth.jwt.secret",
            "is only used with HS* algorithms (never accepted for asymmetric tokens)",
        )
    if not jwt.public_key and not jwt.jwks_url:
        yield Problem("auth.jwt", "asymmetric algorithms need public_key or jwks_url")
    if jwt.public_key:
        yield from _check_public_key(jwt.public_key, algorithms)
    if jwt.jwks_url:
        url = urlsplit(jwt.jwks_url)
        plain_ok = url.scheme == "http" and is_loopback_host(url.hostname or "")
        if not url.hostname or (url.scheme != "https" and not plain_ok):
            # Keys fetched over plain HTTP could be swapped by anyone on the path.
            yield Problem("auth.jwt.jwks_url", "must be an https:// URL (http only to loopback)")
    if jwt.private_key:
        try:
            with open(jwt.private_key, "rb") as file:
                load_pem_private_key(file.read(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            yield Problem(
                "auth.jwt.private_key", f"not a readable unencrypted PEM key: {_why(exc)}"
            )


_FAMILIES: Final[dict[str, tuple[str, tuple[type[Any], ...]]]] = {
    "RS": ("RSA", (rsa.RSAPublicKey,)),
    "PS": ("RSA", (rsa.RSAPublicKey,)),
    "ES": ("EC", (ec.EllipticCurvePublicKey,)),
    "Ed": ("Ed25519/Ed448", (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)),
}


def _check_public_key(path: str, algorithms: set[str]) -> Iterator[Problem]:
    try:
        key = load_public_key(path)
    except (OSError, ValueError, TypeError) as exc:
        yield Problem("auth.jwt.public_key", f"not a readable PEM public key: {_why(exc)}")
        return
    for alg in sorted(algorithms):
        kind, types = _FAMILIES[alg[:2]]
        if not isinstance(key, types):
            yield Problem(
                "auth.jwt.public_key", f"{alg} needs an {kind} key; this key can never verify it"
            )
            return


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "not PEM, or not this kind of key"
