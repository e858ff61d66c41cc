"""Lockout counters: the store protocol, its verdicts, and the in-process store.

Two kinds of scope share one record shape: a (client address, known user) pair, and an
address alone. A record holds the failures counted in the current window, the attempts
still being verified (pending: counted when they start, so a concurrent burst cannot
overshoot), and the time its block ends. The Redis store (`lockout_redis`) runs the very
same rules in Lua so every replica sees one state.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol


class Verdict(IntEnum):
    """The answer to `check`. Its values are the Redis script's return codes."""

    OK = 0
    USER_BLOCKED = 1  # this user is blocked from this address
    ADDRESS_BLOCKED = 2  # this address may not start fresh hashes (past its ceiling)
    USER_BUSY = 3  # failures + pending attempts already reach max_failures
    ADDRESS_BUSY = 4  # failures + pending attempts already reach the address ceiling


@dataclass(frozen=True, slots=True)
class Rules:
    """The numbers a store applies (from `auth.lockout`)."""

    max_failures: int
    address_ceiling: int
    window: float
    block_seconds: float
    max_tracked: int


class Checked(NamedTuple):
    verdict: Verdict
    retry_after: float  # seconds (blocked and busy verdicts)


class Settled(NamedTuple):
    """Failures in the window after this outcome, and the blocks it started."""

    user_failures: int
    address_failures: int
    user_blocked: bool
    address_blocked: bool


NOTHING_SETTLED = Settled(0, 0, False, False)
# A pending attempt whose outcome never came back (a replica died mid-hash) stops counting
# after this long; a verification normally takes well under a second.
PENDING_LEASE = 60.0
BUSY_RETRY_AFTER = 1.0  # pending attempts resolve within a few hash times


class LockoutStore(Protocol):
    """Where lockout counters live. `user` None means the address scope only.

    `check` with `reserve` counts one pending attempt (id `attempt`) in the user and address
    scopes when it answers OK; with `reserve` False it only looks for a block of the user
    (credentials from the verified cache need no hash). `settle` ends a pending attempt
    (`attempt` may be "" for a failure that was never pending, e.g. a bad API key) and,
    when it failed, counts it, starting blocks at the thresholds.
    """

    async def check(
        self, address: str, user: str | None, rules: Rules, *, reserve: bool, attempt: str
    ) -> Checked: ...
    async def settle(
        self, address: str, user: str | None, rules: Rules, *, attempt: str, failed: bool
    ) -> Settled: ...
    async def close(self) -> None: ...


class _Record:
    __slots__ = ("window_start", "failures", "pending", "blocked_until")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.failures = 0
        self.pending: dict[str, float] = {}  # attempt id -> lease expiry
        self.blocked_until = 0.0

    def roll(self, now: float, window: float) -> None:
        if now - self.window_start > window:
            self.window_start, self.failures = now, 0
        if self.pending:
            for attempt in [a for a, until in self.pending.items() if until <= now]:
                del self.pending[attempt]

    def fail(self, now: float, limit: int, block_seconds: float) -> bool:
        """Count a failure; True when it starts a block."""
        self.failures += 1
        if self.failures < limit:
            return False
        self.blocked_until = now + block_seconds
        self.window_start, self.failures = now, 0
        return True


class MemoryLockoutStore:
    """One process's counters, bounded by `max_tracked` (least recently used go first)."""

    __slots__ = ("_clock", "_records")

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _get(self, key: str, now: float, rules: Rules) -> _Record:
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record(now)
            while len(self._records) > rules.max_tracked:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        record.roll(now, rules.window)
        return record

    async def check(
        self, address: str, user: str | None, rules: Rules, *, reserve: bool, attempt: str
    ) -> Checked:
        now = self._clock()
        if not reserve:  # a cached login: look only, never make a record per success
            found = self._records.get(_user_key(address, user)) if user else None
            if found is not None and found.blocked_until > now:
                return Checked(Verdict.USER_BLOCKED, found.blocked_until - now)
            return Checked(Verdict.OK, 0.0)
        user_record = self._get(_user_key(address, user), now, rules) if user else None
        if user_record is not None and user_record.blocked_until > now:
            return Checked(Verdict.USER_BLOCKED, user_record.blocked_until - now)
        record = self._get(address, now, rules)
        if record.blocked_until > now:
            return Checked(Verdict.ADDRESS_BLOCKED, record.blocked_until - now)
        if user_record is not None and (
            user_record.failures + len(user_record.pending) >= rules.max_failures
        ):
            return Checked(Verdict.USER_BUSY, BUSY_RETRY_AFTER)
        if record.failures + len(record.pending) >= rules.address_ceiling:
            return Checked(Verdict.ADDRESS_BUSY, BUSY_RETRY_AFTER)
        record.pending[attempt] = now + PENDING_LEASE
        if user_record is not None:
            user_record.pending[attempt] = now + PENDING_LEASE
        return Checked(Verdict.OK, 0.0)

    async def settle(
        self, address: str, user: str | None, rules: Rules, *, attempt: str, failed: bool
    ) -> Settled:
        now = self._clock()
        record = self._get(address, now, rules)
        record.pending.pop(attempt, None)
        user_record = self._get(_user_key(address, user), now, rules) if user else None
        if user_record is not None:
            user_record.pending.pop(attempt, None)
        if not failed:
            return NOTHING_SETTLED
        user_blocked = user_record is not None and user_record.fail(
            now, rules.max_failures, rules.block_seconds
        )
        address_blocked = record.fail(now, rules.address_ceiling, rules.block_seconds)
        return Settled(
            user_record.failures if user_record is not None else 0,
            record.failures,
            user_blocked,
            address_blocked,
        )

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._records)


def _user_key(address: str, user: str | None) -> str:
    # NUL never occurs in an address; a user name with one still lands in its own record.
    return f"{address}\x00{user}"
