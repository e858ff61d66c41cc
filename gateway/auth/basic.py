"""HTTP Basic: `auth.users` (any accepted passlib hash) and an htpasswd file.

Steady state is a keyed digest and a dict lookup. A cold credential is hashed once, off
the event loop, and concurrent identical ones share that one computation.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.auth.cache import Coalescer, VerifiedCache
from gateway.auth.credentials import decode_basic
from gateway.auth.failure import AuthFailure
from gateway.auth.hashes import MAX_PASSWORD_BYTES
from gateway.auth.htpasswd import HtpasswdSource
from gateway.auth.principal import Principal
from gateway.auth.resources import AuthResources
from gateway.config import AuthConfig

_DIGEST_KIND = b"basic"


class BasicVerifier:
    __slots__ = (
        "_users",
        "_htpasswd",
        "_htpasswd_roles",
        "_cache",
        "_coalescer",
        "_resources",
        "verifications",
    )

    def __init__(
        self, auth: AuthConfig, *, resources: AuthResources, clock: Callable[[], float]
    ) -> None:
        # auth.users wins over an htpasswd entry of the same name (the config is explicit).
        self._users = {
            name: (user.password.reveal(), Principal(name, frozenset(user.roles), "basic"))
            for name, user in auth.users.items()
        }
        self._htpasswd = HtpasswdSource(auth.htpasswd, clock=clock) if auth.htpasswd else None
        self._htpasswd_roles = frozenset(auth.htpasswd_roles)
        self._cache = VerifiedCache(ttl=auth.cache_seconds, max_size=auth.cache_size, clock=clock)
        self._coalescer: Coalescer[bool] = Coalescer()
        self._resources = resources
        self.verifications = 0  # hash computations run (tests and metrics)

    @property
    def cached(self) -> int:
        return len(self._cache)

    async def verify(self, payload: str) -> Principal:
        """`payload` is the base64 text after `Basic `."""
        if self._htpasswd is not None and self._htpasswd.refresh():
            self._cache.clear()  # passwords may have changed or users gone
        digest = self._cache.digest(_DIGEST_KIND, payload)
        principal = self._cache.get(digest)
        if principal is not None:
            return principal
        user, password = decode_basic(payload)
        if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
            raise AuthFailure("malformed")
        account = self._lookup(user)
        generation = self._cache.generation
        hashed = account[0] if account else self._reference_hash()
        if hashed is None:  # no Basic accounts at all: nothing to time
            raise AuthFailure("unknown_credentials")
        ok = await self._coalescer.run(digest, lambda: self._check(password, hashed))
        if account is None:
            # An unknown user still paid for a real hash (against another account's hash,
            # result ignored) so timing does not reveal which user names exist.
            raise AuthFailure("unknown_credentials")
        if not ok:
            raise AuthFailure("bad_password")
        self._cache.put(digest, account[1], generation)
        return account[1]

    async def _check(self, password: str, hashed: str) -> bool:
        self.verifications += 1
        return await self._resources.verify_password(password, hashed)

    def _lookup(self, user: str) -> tuple[str, Principal] | None:
        account = self._users.get(user)
        if account is not None:
            return account
        if self._htpasswd is not None:
            hashed = self._htpasswd.entries.get(user)
            if hashed is not None:
                return hashed, Principal(user, self._htpasswd_roles, "basic")
        return None

    def _reference_hash(self) -> str | None:
        for hashed, _ in self._users.values():
            return hashed
        if self._htpasswd is not None:
            for hashed in self._htpasswd.entries.values():
                return hashed
        return None
