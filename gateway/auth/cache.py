"""Remembering verified passwords, and verifying each cold credential only once at a time.

A password hash costs ~50-300 ms by design; paying it on every request would make the
gateway slow and trivially DoS-able. A success is cached under a keyed digest of the
credential (never the credential itself), for a bounded time and count.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from gateway.auth.principal import Principal

T = TypeVar("T")


class VerifiedCache:
    """Principals of recently verified credentials, by keyed digest.

    The digest key is random per instance: a dump of the cache (or of process memory
    after the instance is gone) cannot be used to test password guesses offline.
    """

    __slots__ = ("_key", "_entries", "_ttl", "_max_size", "_clock", "generation")

    def __init__(self, *, ttl: float, max_size: int, clock: Callable[[], float]) -> None:
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._ttl = ttl
        self._max_size = max_size
        self._clock = clock
        self.generation = 0  # bumped by clear(): verifications begun earlier are not stored

    def digest(self, kind: bytes, credential: str) -> bytes:
        # Keyed BLAKE2b is a MAC; `person` separates the kinds of credential.
        return hashlib.blake2b(
            credential.encode("utf-8", "surrogatepass"), key=self._key, person=kind, digest_size=32
        ).digest()

    def get(self, digest: bytes) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._entries.pop(digest, None)
            return None
        return entry[1]

    def put(
        self, digest: bytes, principal: Principal, generation: int, *, until: float | None = None
    ) -> None:
        """Remember a success for `ttl`, or only `until` (a token's expiry) if sooner."""
        if generation != self.generation or self._ttl <= 0 or self._max_size <= 0:
            return  # the accounts changed while this was being verified
        expires = self._clock() + self._ttl
        if until is not None:
            expires = min(expires, until)
        self._entries[digest] = (expires, principal)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_size:
            self._entries.popitem(last=False)  # oldest first: memory stays bounded

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)


class Coalescer(Generic[T]):
    """Runs one computation per key at a time; concurrent callers share its result.

    N identical cold logins arriving together cost one hash, not N. The computation is
    shielded: a caller that goes away does not cancel it for the others; when the last one
    has gone, it is cancelled (a hash still queued is then never spent).
    """

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: dict[bytes, tuple[asyncio.Future[T], list[int]]] = {}

    async def run(self, key: bytes, compute: Callable[[], Awaitable[T]]) -> T:
        entry = self._running.get(key)
        if entry is None:
            started: asyncio.Future[T] = asyncio.ensure_future(compute())
            entry = self._running[key] = (started, [0])
            started.add_done_callback(lambda done: self._finished(key, done))
        future, waiters = entry
        waiters[0] += 1
        try:
            return await asyncio.shield(future)
        finally:
            waiters[0] -= 1
            if waiters[0] == 0 and not future.done():
                if self._running.get(key) is entry:
                    del self._running[key]  # a later caller starts afresh
                future.cancel()  # nobody wants the answer any more

    def _finished(self, key: bytes, future: asyncio.Future[T]) -> None:
        entry = self._running.get(key)
        if entry is not None and entry[0] is future:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # retrieved: no "never retrieved" noise if every caller left
