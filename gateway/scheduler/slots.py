"""Where the slots are counted: in this process, or shared by every replica (Redis).

The scheduler's fair queue is always local; a `SlotStore` only says whether one more slot
of a key may be taken right now, and keeps the users' virtual token counters when they are
shared. `LocalSlots` is the single-process store: the scheduler counts its slots itself
(synchronously, its fast path), so every call here is trivially true or a no-op.
`gateway.scheduler.redis_slots.RedisSlots` shares them through Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import RateLimitsConfig

SlotKey = tuple[str, str]  # (upstream name, normalised model name)


@dataclass(frozen=True, slots=True)
class Taken:
    """A take's answer: the lease (None: the key is full everywhere) and the shared
    counters of the users asked about (missing: unknown to the store)."""

    holder: str | None
    counters: dict[str, float] = field(default_factory=dict)


class SlotStore(Protocol):
    """Slots of every (upstream, model), and the virtual token counters, as shared.

    `take` raises `gateway.limits.StoreUnavailable` when the store cannot answer (then
    `rate_limits.on_store_error` decides); the others never raise: a give that does not land
    expires with its lease, a charge that does not land stays local (they answer None).
    """

    remote: bool  # False: the scheduler counts slots itself and never calls take/give
    on_store_error: list[Callable[[], None]]  # called on every failed call (metrics)

    async def take(
        self, key: SlotKey, capacity: int, users: Sequence[str], last: bool = False
    ) -> Taken:
        """A lease of `key` if fewer than `capacity` are held everywhere (and it is this
        replica's turn), with the counters of `users`; `last`: it serves the last waiter."""
        ...

    async def give(self, key: SlotKey, holder: str, user: str, delta: float) -> float | None:
        """Free a lease and add `delta` to the user's counter; the counter after, or None."""
        ...

    async def leave(self, key: SlotKey) -> None:
        """This replica has no more waiters for `key`: out of the line of replicas."""
        ...

    async def charge(self, user: str, delta: float, floor: float | None) -> float | None:
        """counter = max(counter, floor) + delta; the counter after, or None."""
        ...

    async def renew(self) -> None:
        """Extend every lease held by this replica (one call)."""
        ...

    async def close(self) -> None: ...


class LocalSlots:
    """One process: nothing shared. The scheduler never awaits it."""

    remote = False

    def __init__(self) -> None:
        self.on_store_error: list[Callable[[], None]] = []

    async def take(
        self, key: SlotKey, capacity: int, users: Sequence[str], last: bool = False
    ) -> Taken:
        return Taken("local")

    async def give(self, key: SlotKey, holder: str, user: str, delta: float) -> float | None:
        return None

    async def leave(self, key: SlotKey) -> None:
        return None

    async def charge(self, user: str, delta: float, floor: float | None) -> float | None:
        return None

    async def renew(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_slot_store(config: RateLimitsConfig, *, lease_seconds: float | None = None) -> SlotStore:
    """Slots shared through `rate_limits.store` when it is Redis, else local."""
    if config.store == "memory":
        return LocalSlots()
    from gateway.scheduler.redis_slots import RedisSlots

    return RedisSlots(config.store, lease_seconds=lease_seconds)
