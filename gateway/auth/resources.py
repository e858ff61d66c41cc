"""Threads and the HTTP session authentication needs, created lazily and closed once.

Successive Authenticators (one per config reload) share one AuthResources, so a reload
neither leaks threads nor sockets; the app's cleanup closes it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import aiohttp

from gateway.auth import hashes
from gateway.auth.hash_queue import FairHashQueue, HashJob

HASH_THREAD_NICE: Final = 10
JWKS_TIMEOUT: Final = aiohttp.ClientTimeout(total=5.0, connect=3.0)


def _lower_priority() -> None:
    """Hash threads yield the CPU to the event-loop thread (Linux: nice is per thread).

    With every core busy hashing, the loop still gets scheduled at once, so streams in
    flight keep their pace. Lowering one's own priority needs no privilege.
    """
    with contextlib.suppress(OSError, AttributeError):  # elsewhere: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)


def _workers() -> int:
    return max(2, os.cpu_count() or 2)


class AuthResources:
    __slots__ = ("_executor", "_session", "_closed", "hash_queue")

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        workers = _workers()
        # At most workers - 1 per address (and 1-2): a thread is always left for the others.
        per_address = max(1, min(2, workers - 1))
        self.hash_queue = FairHashQueue(
            self._hash_executor, workers=workers, per_address=per_address
        )

    def _hash_executor(self) -> ThreadPoolExecutor:
        # A pool of its own: hashes queued here never starve the loop's default executor
        # (DNS lookups for the upstream use it). One thread per core: hashing is CPU-bound
        # and releases the GIL, so the event loop keeps running between them.
        if self._closed:
            raise RuntimeError("authentication resources are closed")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                _workers(), thread_name_prefix="gateway-hash", initializer=_lower_priority
            )
        return self._executor

    def submit_password_check(self, address: str, password: str, hashed: str) -> HashJob[bool]:
        """Queue a password check for `address` (fair across addresses; 429/503 when full)."""
        return self.hash_queue.submit(address, functools.partial(hashes.verify, password, hashed))

    def http_session(self) -> aiohttp.ClientSession:
        """The session JWKS fetches use (aiohttp: never pyjwt's blocking urllib client)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=JWKS_TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
