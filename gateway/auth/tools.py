"""CLI helpers for credentials: hash-password, new-key, token."""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.auth import hashes
from gateway.auth.tokens import HS_ALGORITHMS
from gateway.config_load import ConfigError, load_config

KEY_PREFIX: Final = "ogw_"  # keys never look like a JWT (no dots), and are greppable in leaks
KEY_RANDOM_BYTES: Final = 32
DEFAULT_TTL: Final = 3600
EXIT_USAGE: Final = 2


def add_auth_commands(sub: Any) -> None:
    """Register hash-password, new-key and token on the CLI's subparsers."""
    hp = sub.add_parser(
        "hash-password", help="hash a password for auth.users (reads stdin, or prompts on a tty)"
    )
    hp.add_argument(
        "--scheme",
        choices=sorted(hashes.HASH_SCHEMES),
        default=hashes.DEFAULT_HASH_SCHEME,
        help=f"default {hashes.DEFAULT_HASH_SCHEME} (argon2id); bcrypt refuses passwords "
        f"over {hashes.BCRYPT_MAX_BYTES} bytes, which it would silently cut",
    )
    hp.set_defaults(func=cmd_hash_password)

    nk = sub.add_parser("new-key", help="make an API key; prints it once, plus its config entry")
    nk.add_argument("--user", required=True, help="user the key acts as (auth.users overrides)")
    nk.add_argument("--roles", default="user", help="comma-separated roles (default: user)")
    nk.add_argument("--name", help="key name for logs and metrics (default: USER-<8 hex>)")
    nk.add_argument("--expires", help="optional ISO 8601 expiry, e.g. 2027-01-01T00:00:00Z")
    nk.set_defaults(func=cmd_new_key)

    tk = sub.add_parser("token", help="mint a JWT with the configured HS secret or private key")
    tk.add_argument("--config", required=True, help="config file with auth.jwt")
    tk.add_argument("--sub", required=True, help="subject (and user)")
    tk.add_argument("--roles", default="", help="comma-separated roles")
    tk.add_argument("--ttl", type=int, default=DEFAULT_TTL, help=f"seconds (default {DEFAULT_TTL})")
    tk.add_argument("--kid", help="key id header (when verifiers select keys from a JWKS)")
    tk.set_defaults(func=cmd_token)


def _roles(text: str) -> list[str]:
    return [r.strip() for r in text.split(",") if r.strip()]


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise SystemExit("passwords differ")
        return first
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SystemExit("the password on stdin is not UTF-8") from None
    # One trailing newline is the shell's (`echo`), not the password's.
    return text.removesuffix("\n").removesuffix("\r")


def cmd_hash_password(args: argparse.Namespace) -> int:
    password = _read_password()
    if not password:
        print("empty password refused", file=sys.stderr)
        return EXIT_USAGE
    size = len(password.encode())
    if size > hashes.MAX_PASSWORD_BYTES:
        print(f"password longer than {hashes.MAX_PASSWORD_BYTES} bytes refused", file=sys.stderr)
        return EXIT_USAGE
    if args.scheme == "bcrypt" and size > hashes.BCRYPT_MAX_BYTES:
        # bcrypt would ignore the rest: any password sharing the first 72 bytes would log in.
        print(
            f"this password is {size} bytes; bcrypt uses only the first "
            f"{hashes.BCRYPT_MAX_BYTES} and ignores the rest. Use --scheme argon2 (the "
            "default) or bcrypt_sha256, or a shorter password",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(hashes.HASH_SCHEMES[args.scheme].hash(password))
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    digest = hashlib.sha256(key.encode()).hexdigest()
    name = args.name or f"{args.user}-{digest[:8]}"
    entry: dict[str, Any] = {"name": name, "sha256": digest, "user": args.user}
    entry["roles"] = _roles(args.roles)
    if args.expires:
        entry["expires"] = args.expires
    print(key)
    print("# The key above is shown only once. Paste this under auth.api_keys:", file=sys.stdout)
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in entry.items())
    print(f"- {{{fields}}}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    jwt_config = config.auth.jwt
    if jwt_config is None:
        print("auth.jwt is not configured", file=sys.stderr)
        return EXIT_USAGE
    if args.ttl <= 0:
        print("--ttl must be positive", file=sys.stderr)
        return EXIT_USAGE
    now = int(time.time())
    claims: dict[str, Any] = {"sub": args.sub, "iat": now, "nbf": now, "exp": now + args.ttl}
    claims[jwt_config.user_claim] = args.sub
    claims[jwt_config.roles_claim] = _roles(args.roles)
    if jwt_config.issuer:
        claims["iss"] = jwt_config.issuer
    if jwt_config.audience:
        claims["aud"] = jwt_config.audience
    headers = {"kid": args.kid} if args.kid else None
    hs = [a for a in jwt_config.algorithms if a in HS_ALGORITHMS]
    if hs:
        if jwt_config.secret is None:
            print("auth.jwt.secret is not set", file=sys.stderr)
            return EXIT_USAGE
        print(jwt.encode(claims, jwt_config.secret.reveal(), algorithm=hs[0], headers=headers))
        return 0
    if not jwt_config.private_key:
        print("auth.jwt.private_key is needed to sign asymmetric tokens", file=sys.stderr)
        return EXIT_USAGE
    key = load_pem_private_key(Path(jwt_config.private_key).read_bytes(), password=None)
    algorithm = next((a for a in jwt_config.algorithms if _fits(a, key)), None)
    if algorithm is None:
        print("auth.jwt.private_key fits none of auth.jwt.algorithms", file=sys.stderr)
        return EXIT_USAGE
    print(jwt.encode(claims, key, algorithm=algorithm, headers=headers))  # type: ignore[arg-type]
    return 0


def _fits(algorithm: str, key: Any) -> bool:
    if algorithm[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPrivateKey)
    if algorithm.startswith("ES"):
        return isinstance(key, ec.EllipticCurvePrivateKey)
    return isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
