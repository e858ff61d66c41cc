"""passlib, imported quietly, and the password hash schemes the gateway accepts.

passlib 1.7.4 is unmaintained: importing it touches the deprecated stdlib `crypt` module,
reads `argon2.__version__` (deprecated) and logs a traceback because bcrypt 4 dropped
`__about__`. None of that is a problem for us, but under `-W error` (our tests) it would
break, and the log would alarm operators. Everything that uses passlib imports it from here.
"""

from __future__ import annotations

import logging
import warnings
from typing import Final

__all__ = ["CryptContext", "passlib_hash"]  # re-exported: import passlib through here

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'crypt' is deprecated", DeprecationWarning)
    warnings.filterwarnings("ignore", r"Accessing argon2\.__version__", DeprecationWarning)
    from passlib import hash as passlib_hash  # type: ignore[import-untyped]
    from passlib.context import CryptContext  # type: ignore[import-untyped]


class _BcryptVersionProbeFilter(logging.Filter):
    """Drops passlib's harmless 'error reading bcrypt version' traceback (bcrypt>=4.1)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("(trapped) error reading bcrypt version")


logging.getLogger("passlib.handlers.bcrypt").addFilter(_BcryptVersionProbeFilter())

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"Accessing argon2\.__version__", DeprecationWarning)
    # Load the backends now, inside the filter, rather than on the first login.
    passlib_hash.bcrypt.get_backend()
    passlib_hash.argon2.get_backend()

# Salted, iterated schemes only.
ACCEPTED_SCHEMES: Final = (
    "bcrypt_sha256",
    "bcrypt",
    "argon2",
    "scrypt",
    "pbkdf2_sha256",
    "pbkdf2_sha512",
    "sha512_crypt",
    "sha256_crypt",
    "apr_md5_crypt",  # htpasswd -m (Apache's default before bcrypt)
    "md5_crypt",  # openssl passwd -1 (nginx docs)
)
# Recognised so the error can say *why* it is refused. Plaintext is everything else.
_REFUSED: Final = {
    "des_crypt": "crypt-DES (8-character passwords, crackable in minutes)",
    "bsdi_crypt": "BSDi crypt (DES-based)",
    "bigcrypt": "bigcrypt (DES-based)",
    "ldap_sha1": "unsalted SHA-1 ({SHA}, htpasswd -s)",
    "ldap_salted_sha1": "salted single SHA-1 ({SSHA})",
    "ldap_md5": "unsalted MD5 ({MD5})",
    "hex_md5": "unsalted MD5",
    "hex_sha1": "unsalted SHA-1",
    "hex_sha256": "unsalted SHA-256",
    "hex_sha512": "unsalted SHA-512",
}

PASSWORDS: Final = CryptContext(schemes=list(ACCEPTED_SCHEMES))
_REFUSED_CONTEXT: Final = CryptContext(schemes=list(_REFUSED))

# `hash-password --scheme` choices and their costs (~50-500 ms on a current core).
HASH_SCHEMES: Final = {
    "argon2": passlib_hash.argon2,  # passlib's defaults: argon2id, 64 MiB, t=3
    "bcrypt_sha256": passlib_hash.bcrypt_sha256.using(rounds=12),  # no 72-byte cut
    "bcrypt": passlib_hash.bcrypt.using(rounds=12),
    "pbkdf2_sha256": passlib_hash.pbkdf2_sha256.using(rounds=600_000),  # OWASP 2023
}
# The default has no length trap: plain bcrypt ignores every byte after the 72nd.
DEFAULT_HASH_SCHEME: Final = "argon2"
BCRYPT_MAX_BYTES: Final = 72

MAX_PASSWORD_BYTES: Final = 1024  # longer "passwords" are refused before hashing (CPU DoS)


def identify(hashed: str) -> str | None:
    """The accepted scheme of `hashed`, or None."""
    try:
        return PASSWORDS.identify(hashed)  # type: ignore[no-any-return]
    except (ValueError, TypeError):
        return None


def refusal(hashed: str) -> str | None:
    """Why `hashed` is not accepted (None when it is). Never repeats the value itself."""
    if identify(hashed) is not None:
        if _malformed(hashed):
            return "is a malformed password hash"
        return None
    try:
        refused = _REFUSED_CONTEXT.identify(hashed)
    except (ValueError, TypeError):
        refused = None
    if refused:
        return f"uses {_REFUSED[refused]}, which is refused; re-hash with bcrypt or argon2"
    return (
        "is not a password hash (plaintext passwords are refused; "
        "make one with `ollama-gateway hash-password`)"
    )


def _malformed(hashed: str) -> bool:
    """Parses the hash without computing it (checking many users must stay fast)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. odd bcrypt padding bits: still usable
            PASSWORDS.handler(PASSWORDS.identify(hashed)).from_string(hashed)
    except (ValueError, TypeError, KeyError):
        return True
    return False


def verify(password: str, hashed: str) -> bool:
    """Blocking: run it in an executor. False on any malformed input, never an exception."""
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bool(PASSWORDS.verify(password, hashed))
    except (ValueError, TypeError, UserWarning):  # fail closed on anything odd
        return False
