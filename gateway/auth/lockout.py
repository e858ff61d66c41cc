"""Brute-force protection, scoped to what is attacked.

Failed passwords count per (client address, user): past `max_failures` that user is
refused from that address (429, the right password included: a 200 would make the block
an oracle), while other users, keys and tokens from the same address (an office NAT, a
web UI's server) keep working. Failures that name no known user count per address: they
slow the 401s down and, past the much higher `address_ceiling`, the address may start no
fresh password hash (cached passwords, keys and tokens still pass).

Addresses are already resolved through `trusted_proxies` (not spoofable); IPv6 counts per
/64, since one host usually owns a whole /64. A success never wipes a count: otherwise one
valid account would let an attacker reset the counter between guesses at another.

The counters live in a store: this process's memory, or Redis when `rate_limits.store`
is a Redis URL, so replicas share blocks. When Redis is unreachable the process falls back
to its own memory (protection per replica rather than none, logins keep working).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Final, Literal, NamedTuple

from gateway.auth.lockout_store import (
    NOTHING_SETTLED,
    Checked,
    LockoutStore,
    MemoryLockoutStore,
    Rules,
    Settled,
    Verdict,
)
from gateway.config import LockoutConfig

log = logging.getLogger("gateway.auth")

DELAY_BASE: Final = 0.1  # seconds added to the first slowed failure, doubling after
DELAY_MAX: Final = 2.0
BlockScope = Literal["user", "address"]


@lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


RefusalReason = Literal["locked_out", "address_locked_out", "login_busy"]


class Refusal(NamedTuple):
    """Why an attempt may not proceed: a 429 with `retry_after` seconds."""

    reason: RefusalReason
    message: str
    retry_after: int


_REFUSALS: Final[dict[Verdict, tuple[RefusalReason, str]]] = {
    Verdict.USER_BLOCKED: ("locked_out", "too many failed logins; try again later"),
    Verdict.ADDRESS_BLOCKED: (
        "address_locked_out",
        "too many failed logins from this address; try again later",
    ),
    Verdict.USER_BUSY: ("login_busy", "too many login attempts in progress; try again later"),
    Verdict.ADDRESS_BUSY: ("login_busy", "too many login attempts in progress; try again later"),
}


def _refusal(checked: Checked) -> Refusal | None:
    if checked.verdict == Verdict.OK:
        return None
    reason, message = _REFUSALS[checked.verdict]
    return Refusal(reason, message, max(1, math.ceil(checked.retry_after)))


def _delay(failures: int, slow_after: int) -> float:
    if failures <= slow_after:
        return 0.0
    return min(DELAY_MAX, DELAY_BASE * 2.0 ** (failures - slow_after - 1))


class Lockout:
    """The lockout rules over a store. One object for the app's life: reloads `configure` it,
    so blocks, pending attempts and the `on_block` hooks (metrics) survive them."""

    __slots__ = (
        "_rules",
        "_store",
        "_fallback",
        "_store_errors",
        "_store_ok",
        "_ids",
        "_settling",
        "on_block",
    )

    def __init__(
        self,
        config: LockoutConfig,
        *,
        clock: Callable[[], float],
        store: LockoutStore | None = None,
        store_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._rules = _rules(config)
        self._fallback = MemoryLockoutStore(clock=clock)
        self._store: LockoutStore = store if store is not None else self._fallback
        self._store_errors = store_errors  # a shared store's failures: use the fallback
        self._store_ok = True  # logs once per outage, not once per request
        self._ids = itertools.count()
        self._settling: set[asyncio.Task[float]] = set()  # strong refs until they land
        self.on_block: list[Callable[[BlockScope], None]] = []

    def configure(self, config: LockoutConfig) -> Lockout:
        """New numbers from a reloaded config; the counters stay (a reload unblocks no one)."""
        self._rules = _rules(config)
        return self

    @property
    def enabled(self) -> bool:
        return self._rules.max_failures > 0

    def new_attempt(self) -> str:
        return f"{id(self):x}-{next(self._ids)}"  # unique per process and per attempt

    async def blocked(self, address: str, user: str) -> Refusal | None:
        """A refusal when `user` is blocked from `address` (checked even on cached logins)."""
        if not self.enabled:
            return None
        return _refusal(await self._check(address, user, reserve=False, attempt=""))

    async def begin(self, address: str, user: str | None, attempt: str) -> Refusal | None:
        """Before a fresh hash: refuse, or count the attempt as pending in its scopes."""
        if not self.enabled:
            return None
        return _refusal(await self._check(address, user, reserve=True, attempt=attempt))

    async def settle(self, address: str, user: str | None, attempt: str, failed: bool) -> float:
        """End a pending attempt (or count a cheap failure: `attempt` ""); the 401's delay."""
        if not self.enabled:
            return 0.0
        settled = await self._settle(address, user, attempt=attempt, failed=failed)
        if not failed:
            return 0.0
        if settled.user_blocked:
            self._blocked("user", address, user)
        if settled.address_blocked:
            self._blocked("address", address, None)
        rules = self._rules
        # An address carries many users: it is slowed only past one user's whole quota.
        return max(
            _delay(settled.user_failures, rules.max_failures // 2) if user else 0.0,
            _delay(settled.address_failures, rules.max_failures),
        )

    def settle_soon(self, address: str, user: str | None, attempt: str, failed: bool) -> None:
        """`settle` from a task of its own: for callers being cancelled, who cannot await."""
        task = asyncio.get_running_loop().create_task(self.settle(address, user, attempt, failed))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _check(
        self, address: str, user: str | None, *, reserve: bool, attempt: str
    ) -> Checked:
        try:
            checked = await self._store.check(
                address, user, self._rules, reserve=reserve, attempt=attempt
            )
        except self._store_errors as error:
            self._store_failed(error)
            return await self._fallback.check(
                address, user, self._rules, reserve=reserve, attempt=attempt
            )
        self._store_answered()
        return checked

    async def _settle(
        self, address: str, user: str | None, *, attempt: str, failed: bool
    ) -> Settled:
        try:
            settled = await self._store.settle(
                address, user, self._rules, attempt=attempt, failed=failed
            )
        except self._store_errors as error:
            self._store_failed(error)
            if not failed:
                return NOTHING_SETTLED
            return await self._fallback.settle(
                address, user, self._rules, attempt=attempt, failed=failed
            )
        self._store_answered()
        return settled

    def _store_failed(self, error: BaseException) -> None:
        if self._store_ok:
            self._store_ok = False
            log.warning(
                "lockout store unreachable (%s); counting in this process until it is back",
                type(error).__name__,
            )

    def _store_answered(self) -> None:
        if not self._store_ok:
            self._store_ok = True
            log.warning("lockout store reachable again")

    def _blocked(self, scope: BlockScope, address: str, user: str | None) -> None:
        rules = self._rules
        if scope == "user":
            # The scope only (address and a configured user name), never a credential.
            log.warning(
                "auth: user %r blocked from %s for %gs after %d failed passwords",
                user,
                address,
                rules.block_seconds,
                rules.max_failures,
            )
        else:
            log.warning(
                "auth: %s may start no new password checks for %gs after %d failed logins",
                address,
                rules.block_seconds,
                rules.address_ceiling,
            )
        for hook in self.on_block:
            try:
                hook(scope)
            except Exception:  # a metrics hook must never break authentication
                log.exception("lockout on_block hook failed")

    async def close(self) -> None:
        if self._settling:
            await asyncio.wait(self._settling, timeout=2.0)
        await self._store.close()

    def __len__(self) -> int:
        """Records this process holds (its memory bound is `max_tracked`)."""
        return len(self._fallback)


def _rules(config: LockoutConfig) -> Rules:
    return Rules(
        max_failures=config.max_failures,
        address_ceiling=max(config.address_ceiling, config.max_failures),
        window=config.window,
        block_seconds=config.block_seconds,
        max_tracked=max(1, config.max_tracked),
    )


def build_lockout(
    config: LockoutConfig, store_url: str, *, clock: Callable[[], float] | None
) -> Lockout:
    """The lockout over `rate_limits.store`: this process's memory, or the shared Redis.

    Built once per app, like the limiter: a change of `store` itself needs a restart.
    """
    if store_url == "memory":
        return Lockout(config, clock=clock or time.time)
    from gateway.auth.lockout_redis import STORE_ERRORS, RedisLockoutStore

    return Lockout(
        config,
        clock=clock or time.time,
        store=RedisLockoutStore(store_url, clock=clock),
        store_errors=STORE_ERRORS,
    )
