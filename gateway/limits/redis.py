"""The Redis store: limits shared by every gateway replica.

Each admission is one EVALSHA that checks the rate, the concurrency slots and the token
budgets and commits them atomically. Concurrency slots are leases (a sorted set scored by
expiry), renewed while a long stream runs, so the slots of a crashed replica free
themselves. Errors become `StoreUnavailable`, counted and logged once per outage; the
client reconnects on its own when Redis comes back.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.config import LimitsConfig
from gateway.limits import Clock, Decision, StoreHealth, StoreUnavailable
from gateway.limits.core import DAY, EPSILON, MINUTE, State, evaluate, rpm_params
from gateway.limits.redis_scripts import ADMIT, FINISH, RENEW

# A slot outlives a dead replica by at most this long; live streams renew it every third.
LEASE_SECONDS = 30.0
# Admission waits on Redis: fail fast, then `on_store_error` decides.
SOCKET_TIMEOUT = 1.0
KEY_PREFIX = "ogw:"

STORE_ERRORS = (RedisError, OSError, TimeoutError)


def connect(url: str) -> aioredis.Redis:
    """A client for the shared store (limits and the scheduler's slots use the same setup)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT,
        # One immediate retry on a fresh connection (a pooled one may be stale after a
        # Redis restart); never a backoff that would hold requests for seconds.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


def _num(value: float | int | None) -> str:
    return "" if value is None else repr(float(value))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLimiter(StoreHealth):
    remote = True
    lease_seconds: float | None = LEASE_SECONDS

    def __init__(self, url: str, *, clock: Clock | None = None) -> None:
        super().__init__()
        self.url = url
        self.clock = clock  # None: the Redis server's clock (shared by all replicas)
        self.client = connect(url)
        self._admit = self.client.register_script(ADMIT)
        self._finish = self.client.register_script(FINISH)
        self._renew = self.client.register_script(RENEW)

    @staticmethod
    def keys(key: str) -> list[str]:
        return [f"{KEY_PREFIX}{{{key}}}:s", f"{KEY_PREFIX}{{{key}}}:c"]

    def _now(self) -> str:
        return "" if self.clock is None else repr(self.clock())

    async def admit(self, key: str, limits: LimitsConfig, lease: str) -> Decision:
        gcra = rpm_params(limits)
        args = [
            self._now(),
            _num(gcra[0]) if gcra else "",
            _num(gcra[1]) if gcra else "",
            repr(EPSILON),
            _num(limits.concurrency),
            lease,
            repr(LEASE_SECONDS),
            _num(limits.tokens_per_minute),
            repr(MINUTE),
            _num(limits.tokens_per_day),
            repr(DAY),
        ]
        try:
            reply = await self._admit(keys=self.keys(key), args=args)
        except STORE_ERRORS as error:
            self.failed(error)
            raise StoreUnavailable(str(error)) from error
        self.succeeded()
        admitted = int(reply[0]) == 1
        now = float(text(reply[1]))
        state = State(
            rpm_tat=float(text(reply[2])),
            tpm_tat=float(text(reply[3])),
            tpd_tat=float(text(reply[4])),
            inflight=int(reply[5]),
        )
        # The script decided; the same arithmetic here only describes the decision.
        decision, _ = evaluate(limits, state, now)
        if decision.allowed != admitted:  # a float disagreement: Redis's commit wins
            decision = Decision(
                allowed=admitted,
                limit=None if admitted else "requests_per_minute",
                retry_after=0.0 if admitted else 1.0,
                quota=decision.quota,
            )
        return decision

    async def finish(self, key: str, lease: str, tokens: int, limits: LimitsConfig) -> None:
        held = limits.concurrency is not None
        charged = tokens > 0 and (
            limits.tokens_per_minute is not None or limits.tokens_per_day is not None
        )
        if not held and not charged:
            return
        args = [
            self._now(),
            lease if held else "",
            str(max(0, tokens)),
            _num(limits.tokens_per_minute),
            repr(MINUTE),
            _num(limits.tokens_per_day),
            repr(DAY),
        ]
        try:
            await self._finish(keys=self.keys(key), args=args)
        except STORE_ERRORS as error:  # the lease expires by itself; the charge is lost
            self.failed(error)
            return
        self.succeeded()

    async def renew(self, key: str, lease: str) -> None:
        try:
            await self._renew(
                keys=self.keys(key)[1:], args=[self._now(), lease, repr(LEASE_SECONDS)]
            )
        except STORE_ERRORS as error:
            self.failed(error)
            return
        self.succeeded()

    async def close(self) -> None:
        if self.background:  # let releases of already-finished requests land first
            await asyncio.wait(self.background, timeout=SOCKET_TIMEOUT * 2)
        await self.client.aclose()
