"""Threads and the HTTP session authentication needs, created lazily and closed once.

Successive Authenticators (one per config reload) share one AuthResources, so a reload
neither leaks threads nor sockets; the app's cleanup closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import aiohttp

from gateway.auth import hashes
from gateway.errors import TooManyRequests

# Cold verifications waiting for a thread at most; beyond it new ones are refused (429)
# rather than queued without bound (a flood of distinct bad passwords is a CPU DoS).
MAX_PENDING_HASHES: Final = 256
HASH_THREAD_NICE: Final = 10
JWKS_TIMEOUT: Final = aiohttp.ClientTimeout(total=5.0, connect=3.0)


def _lower_priority() -> None:
    """Hash threads yield the CPU to the event-loop thread (Linux: nice is per thread).

    With every core busy hashing, the loop still gets scheduled at once, so streams in
    flight keep their pace. Lowering one's own priority needs no privilege.
    """
    with contextlib.suppress(OSError, AttributeError):  # elsewhere: normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)


class AuthResources:
    __slots__ = ("_executor", "_session", "_pending")

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._session: aiohttp.ClientSession | None = None
        self._pending = 0

    def _hash_executor(self) -> ThreadPoolExecutor:
        # A pool of its own: hashes queued here never starve the loop's default executor
        # (DNS lookups for the upstream use it). One thread per core: hashing is CPU-bound
        # and releases the GIL, so the event loop keeps running between them.
        if self._executor is None:
            workers = max(2, os.cpu_count() or 2)
            self._executor = ThreadPoolExecutor(
                workers, thread_name_prefix="gateway-hash", initializer=_lower_priority
            )
        return self._executor

    async def verify_password(self, password: str, hashed: str) -> bool:
        """Check a password against a passlib hash off the event loop."""
        if self._pending >= MAX_PENDING_HASHES:
            raise TooManyRequests(
                "too many logins in progress", reason="auth_busy", headers={"Retry-After": "1"}
            )
        self._pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._hash_executor(), hashes.verify, password, hashed
            )
        finally:
            self._pending -= 1

    def http_session(self) -> aiohttp.ClientSession:
        """The session JWKS fetches use (aiohttp: never pyjwt's blocking urllib client)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=JWKS_TIMEOUT, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
