"""Admission control: request rates, concurrency and token budgets per principal.

The `Limiter` protocol is what the admit stage talks to; `memory.MemoryLimiter` and
`redis.RedisLimiter` implement it with the same arithmetic (`core`), so one behavioural
test suite runs against both. `build_limiter` is the only place that picks a store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.config import LimitsConfig, RateLimitsConfig

log = logging.getLogger("gateway.limits")

Clock = Callable[[], float]  # seconds, as a float


@dataclass(frozen=True, slots=True)
class Quota:
    """What the RateLimit-* headers report: the quota closest to running out."""

    limit: int
    remaining: int
    reset: float  # seconds until the quota is whole again


@dataclass(frozen=True, slots=True)
class Decision:
    """The limiter's answer. `limit` names the limit that refused (None when admitted)."""

    allowed: bool
    limit: str | None = None
    retry_after: float = 0.0  # seconds until a retry can succeed (refused only)
    quota: Quota | None = None


ADMITTED = Decision(allowed=True)


class StoreUnavailable(Exception):
    """The shared store could not answer; `rate_limits.on_store_error` decides."""


class Limiter(Protocol):
    """Counts per key (the principal's user name, never a raw credential or address).

    `admit` checks every configured limit at once and, only when all pass, takes a request
    slot and a concurrency slot (`lease`). `finish` gives the slot back and charges the
    tokens the request used; it never raises. `renew` keeps a long stream's lease alive
    (stores whose slots expire on their own; `lease_seconds` is None for the others).
    """

    remote: bool  # True when calls really wait on the network (finish must be shielded)
    lease_seconds: float | None
    store_errors: int
    on_store_error: list[Callable[[], None]]
    background: set[asyncio.Task[None]]  # releases still running after their request ended

    async def admit(self, key: str, limits: LimitsConfig, lease: str) -> Decision: ...
    async def finish(self, key: str, lease: str, tokens: int, limits: LimitsConfig) -> None: ...
    async def renew(self, key: str, lease: str) -> None: ...
    async def close(self) -> None: ...


class StoreHealth:
    """Counts store failures for metrics and logs once per outage, not once per request."""

    def __init__(self) -> None:
        self.store_errors = 0
        self.on_store_error: list[Callable[[], None]] = []
        self.background: set[asyncio.Task[None]] = set()
        self._healthy = True

    def failed(self, error: BaseException) -> None:
        self.store_errors += 1
        if self._healthy:
            self._healthy = False
            log.warning(
                "rate-limit store unreachable (%s: %s); on_store_error applies",
                type(error).__name__,
                error,
            )
        for hook in self.on_store_error:
            try:
                hook()
            except Exception:  # a metrics hook must never break admission
                log.exception("on_store_error hook failed")

    def succeeded(self) -> None:
        if not self._healthy:
            self._healthy = True
            log.warning("rate-limit store reachable again")


def build_limiter(config: RateLimitsConfig, *, clock: Clock | None = None) -> Limiter:
    """The store named by `rate_limits.store`. It lives as long as the app: reloads keep
    counters (a change of `store` itself needs a restart)."""
    if config.store == "memory":
        from gateway.limits.memory import MemoryLimiter

        return MemoryLimiter(max_keys=config.memory_max_keys, clock=clock)
    from gateway.limits.redis import RedisLimiter

    return RedisLimiter(config.store, clock=clock)
