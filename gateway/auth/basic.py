"""HTTP Basic: `auth.users` (any accepted passlib hash) and an htpasswd file.

Steady state is a keyed digest and a dict lookup (plus the lockout's check that this user
is not blocked from this address). A cold credential is hashed once, off the event loop,
through the fair per-address hash queue; concurrent identical ones from one address share
that one computation, which the lockout counts as pending from the moment it starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.auth.cache import Coalescer, VerifiedCache
from gateway.auth.credentials import decode_basic
from gateway.auth.failure import AuthFailure
from gateway.auth.hashes import MAX_PASSWORD_BYTES
from gateway.auth.htpasswd import HtpasswdSource
from gateway.auth.lockout import Lockout, Refusal
from gateway.auth.principal import Principal
from gateway.auth.resources import AuthResources
from gateway.config import AuthConfig
from gateway.errors import TooManyRequests

_DIGEST_KIND = b"basic"


def refused(refusal: Refusal) -> TooManyRequests:
    return TooManyRequests(
        refusal.message,
        reason=refusal.reason,
        headers={"Retry-After": str(refusal.retry_after)},
    )


class BasicVerifier:
    __slots__ = (
        "_users",
        "_htpasswd",
        "_htpasswd_roles",
        "_cache",
        "_coalescer",
        "_resources",
        "_lockout",
        "verifications",
    )

    def __init__(
        self,
        auth: AuthConfig,
        *,
        resources: AuthResources,
        lockout: Lockout,
        clock: Callable[[], float],
    ) -> None:
        # auth.users wins over an htpasswd entry of the same name (the config is explicit).
        self._users = {
            name: (user.password.reveal(), Principal(name, frozenset(user.roles), "basic"))
            for name, user in auth.users.items()
        }
        self._htpasswd = HtpasswdSource(auth.htpasswd, clock=clock) if auth.htpasswd else None
        self._htpasswd_roles = frozenset(auth.htpasswd_roles)
        self._cache = VerifiedCache(ttl=auth.cache_seconds, max_size=auth.cache_size, clock=clock)
        self._coalescer: Coalescer[tuple[bool, float]] = Coalescer()
        self._resources = resources
        self._lockout = lockout
        self.verifications = 0  # hash computations started (tests and metrics)

    @property
    def cached(self) -> int:
        return len(self._cache)

    async def verify(self, payload: str, address: str) -> Principal:
        """`payload` is the base64 text after `Basic `; `address` the client's lockout key.

        Raises AuthFailure (401; its `delay` set when the lockout counted it) or a 429.
        """
        if self._htpasswd is not None and self._htpasswd.refresh():
            self._cache.clear()  # passwords may have changed or users gone
        digest = self._cache.digest(_DIGEST_KIND, payload)
        principal = self._cache.get(digest)
        if principal is not None:
            # Blocked means blocked, the right (cached) password included: else an oracle.
            refusal = await self._lockout.blocked(address, principal.user)
            if refusal is not None:
                raise refused(refusal)
            return principal
        user, password = decode_basic(payload)
        if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
            raise AuthFailure("malformed")
        account = self._lookup(user)
        generation = self._cache.generation
        hashed = account[0] if account else self._reference_hash()
        if hashed is None:  # no Basic accounts at all: nothing to time
            raise AuthFailure("unknown_credentials")
        scope = user if account else None  # unknown names count against the address only
        ok, delay = await self._coalescer.run(
            address.encode() + b"\0" + digest,
            lambda: self._fresh(address, scope, password, hashed),
        )
        if account is None:
            # An unknown user still paid for a real hash (against another account's hash,
            # result ignored) so timing does not reveal which user names exist.
            raise AuthFailure("unknown_credentials", delay=delay)
        if not ok:
            raise AuthFailure("bad_password", delay=delay)
        self._cache.put(digest, account[1], generation)
        return account[1]

    async def _fresh(
        self, address: str, user: str | None, password: str, hashed: str
    ) -> tuple[bool, float]:
        """One cold check: reserved in the lockout before it is queued, settled after."""
        lockout = self._lockout
        attempt = lockout.new_attempt()
        refusal = await lockout.begin(address, user, attempt)
        if refusal is not None:
            raise refused(refusal)
        job = None
        try:
            job = self._resources.submit_password_check(address, password, hashed)
            ok = await self._resources.hash_queue.wait(job)
        except BaseException:
            # Left before the result (or the queue was full): an attempt whose hash ran
            # counts as failed (fail closed), one that never ran costs nothing.
            lockout.settle_soon(address, user, attempt, failed=job is not None and job.started)
            raise
        finally:
            if job is not None and job.started:
                self.verifications += 1
        # Shielded: a client leaving now cannot keep its spent guess from being counted.
        return ok, await asyncio.shield(lockout.settle(address, user, attempt, not ok or not user))

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
