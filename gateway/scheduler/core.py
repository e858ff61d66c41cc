"""The fair scheduler: slots per (upstream, model) and a fair queue in front of them.

It knows users, slots and tokens, never HTTP. Ollama runs a few requests per loaded model
at once and queues the rest first come, first served, so one user's batch of 30 makes
everyone wait behind it. Here every inference request takes a slot of its model; with none
free it waits, and when a slot frees the next request is chosen:

- strictly by priority (higher first);
- within a priority, the waiting user with the lowest virtual token counter (Sheng et al.,
  "Fairness in Serving Large Language Models", OSDI '24): a user's counter advances by the
  tokens each of its requests used, divided by its weight (estimated at dispatch,
  reconciled at the end), so users with equal weights get equal tokens, whatever the size
  of their requests;
- a user who starts waiting is lifted to the lowest counter among those already waiting
  (or to the counter of the last dispatch when nobody waits), so idle time is not banked;
- one user's own requests for one model go in arrival order.

The fast path (a free slot, nobody waiting) creates no future and no timer.

With a remote `SlotStore` (Redis: several replicas share the slots), `remote.RemoteDispatch`
wins the leases for the waiters this queue chooses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gateway.scheduler.remote import RemoteDispatch
from gateway.scheduler.slots import LocalSlots, SlotKey, SlotStore

log = logging.getLogger("gateway.scheduler")

Clock = Callable[[], float]

DEFAULT_SERVICE_SECONDS = 5.0  # Retry-After estimates before any request has finished
SERVICE_SMOOTHING = 0.2  # weight of the newest service time in the moving average
MAX_IDLE_USERS = 100_000  # counters kept for users with nothing waiting or running
MAX_POOLS = 10_000  # (upstream, model) pools kept; idle ones go first (model names are input)
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 3600


class SchedulingPolicy(Protocol):
    """What the scheduler asks the config; replaced whole on reload."""

    @property
    def max_queue_per_user(self) -> int: ...
    @property
    def max_queue(self) -> int: ...
    @property
    def queue_timeout(self) -> float: ...

    def slots_for(self, key: SlotKey) -> int: ...
    def share_of(self, user: str, roles: frozenset[str]) -> tuple[float, int]:
        """(weight, priority) of a user holding these roles."""
        ...


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request asking for a slot."""

    user: str
    key: SlotKey
    estimate: int  # tokens this request is expected to use (prompt + completion)
    roles: frozenset[str] = frozenset()  # for the user's weight and priority (policy)
    # Other (upstream, model) slots that can serve it too, in order of preference after `key`:
    # it takes the first free one, or waits for whichever frees first.
    alternatives: tuple[SlotKey, ...] = ()

    @property
    def keys(self) -> tuple[SlotKey, ...]:
        return (self.key, *self.alternatives)


class QueueRejected(Exception):
    """The request cannot wait: the user's queue or the whole queue is full, or it timed out.

    `reason` is `user_queue_full`, `queue_full`, `timeout` or `slot_store` (the shared slot
    store is unreachable and `on_store_error` is deny); `retry_after` is an honest estimate
    in whole seconds of when a retry could be served.
    """

    def __init__(self, reason: str, retry_after: int, waited: float = 0.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.waited = waited


@dataclass(slots=True)
class _User:
    roles: frozenset[str]
    counter: float = 0.0
    weight: float = 1.0
    priority: int = 0
    waiting: int = 0  # requests waiting, all models
    running: int = 0  # slots held, all models
    last_dispatch: int = 0  # breaks ties between equal counters: least recently served first
    syncing: int = 0  # counter updates on their way to a remote store


@dataclass(slots=True, eq=False)
class _Waiter:
    ticket: Ticket
    user: _User
    future: asyncio.Future[Grant]
    enqueued: float
    seq: int
    pools: list[_Pool]  # it waits in each (several servers can serve it), counted once
    timer: asyncio.TimerHandle | None = None
    queued: bool = True


@dataclass(slots=True, eq=False)
class _Pool:
    """One (upstream, model): slots in use and, per user, the requests waiting in order."""

    key: SlotKey
    in_use: int = 0
    waiting: int = 0
    queues: dict[str, deque[_Waiter]] = field(default_factory=dict)
    service_seconds: float = DEFAULT_SERVICE_SECONDS  # moving average, for Retry-After
    pump: asyncio.Task[None] | None = None  # remote store only: takes leases for waiters
    wake: asyncio.Event | None = None  # remote store only: a local release, a new waiter
    # Remote store only: refunds held until the pump has chosen the next waiter (see _release).
    refunds: list[tuple[_User, str, float]] = field(default_factory=list)


class Grant:
    """A slot held by one request; `release` gives it back exactly once."""

    __slots__ = (
        "_scheduler",
        "_pool",
        "_user",
        "_ticket",
        "_charged",
        "_holder",
        "started",
        "waited",
    )

    def __init__(
        self,
        scheduler: FairScheduler,
        pool: _Pool,
        user: _User,
        ticket: Ticket,
        charged: float,
        started: float,
        waited: float,
        holder: str | None = None,
    ) -> None:
        self._scheduler = scheduler
        self._pool: _Pool | None = pool
        self._user = user
        self._ticket = ticket
        self._charged = charged
        self._holder = holder  # the remote store's lease (None: a local slot)
        self.started = started
        self.waited = waited  # seconds spent in the queue

    @property
    def key(self) -> SlotKey:
        return self._ticket.key

    def release(self, tokens: int | None) -> None:
        """Free the slot and reconcile the charge with the tokens really used.

        `tokens=None` keeps the estimate (nothing better is known); 0 refunds it (the request
        never ran). Idempotent: only the first call counts.
        """
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self._scheduler._release(pool, self._user, self._ticket, self._charged, tokens, self)


class FairScheduler:
    """Slots and fair queues for every (upstream, model); one per app, kept across reloads."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        *,
        clock: Clock = time.monotonic,
        store: SlotStore | None = None,
        fail_open: bool = False,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self.store: SlotStore = store if store is not None else LocalSlots()
        # A remote store that cannot answer: True hands out local slots, False refuses (503).
        self.fail_open = fail_open
        self._remote = RemoteDispatch(self) if self.store.remote else None
        self._dispatch = self._remote.kick if self._remote is not None else self._pump
        self._pools: dict[SlotKey, _Pool] = {}
        self._users: dict[str, _User] = {}
        self._backlogged: set[str] = set()  # users with at least one request waiting
        self._seq = 0
        self._dispatches = 0
        self.waiting_total = 0
        self.virtual_time = 0.0  # the counter of the last dispatch: newcomers start here

    # --- the API the queue stage uses -----------------------------------------------------

    async def acquire(self, ticket: Ticket) -> Grant:
        """A slot for `ticket`, waiting fairly for one; QueueRejected when it cannot wait.

        Cancelling the caller (its client left) removes it from the queue at once.
        """
        pools = [self._pool(key) for key in ticket.keys]
        user = self._user(ticket)
        for pool in pools:  # in order of preference: the first free slot
            capacity = self.policy.slots_for(pool.key)
            if capacity == 0 or (
                pool.waiting == 0 and pool.in_use < capacity and self._remote is None
            ):
                return self._grant(pool, user, ticket, waited=0.0)
        pool = pools[0]
        policy = self.policy
        if user.waiting >= policy.max_queue_per_user:
            raise QueueRejected("user_queue_full", self._retry_after(pool, user.waiting))
        if self.waiting_total >= policy.max_queue:
            raise QueueRejected("queue_full", self._retry_after(pool, pool.waiting))
        waiter = self._enqueue(pools, user, ticket)
        if self._remote is not None:
            for each in pools:
                self._remote.kick(each)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(pool, waiter)
            raise

    def reconfigure(self, policy: SchedulingPolicy) -> None:
        """A reload: new slots, weights and priorities apply to the next dispatches;
        waiting requests stay queued, running ones keep their slots."""
        self.policy = policy
        for name in self._backlogged:
            user = self._users[name]
            user.weight, user.priority = policy.share_of(name, user.roles)
        for pool in list(self._pools.values()):
            self._dispatch(pool)

    async def close(self) -> None:
        """Stop the pumps and the store (leases still held expire on their own)."""
        if self._remote is not None:
            await self._remote.close(list(self._pools.values()))
        await self.store.close()

    # --- what metrics and Retry-After read --------------------------------------------------

    def slots(self) -> list[tuple[SlotKey, int, int]]:
        """(key, in use, capacity) of every pool seen."""
        return [(k, p.in_use, self.policy.slots_for(k)) for k, p in self._pools.items()]

    def load(self, key: SlotKey) -> tuple[int, int]:
        """(slots in use, capacity) of one (upstream, model)."""
        pool = self._pools.get(key)
        return (pool.in_use if pool is not None else 0), self.policy.slots_for(key)

    def waiting_by_priority(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for name in self._backlogged:
            user = self._users[name]
            counts[user.priority] = counts.get(user.priority, 0) + user.waiting
        return counts

    def counter(self, user: str) -> float:
        state = self._users.get(user)
        return state.counter if state is not None else 0.0

    def backlogged_users(self) -> set[str]:
        return set(self._backlogged)

    # --- internals ------------------------------------------------------------------------

    def _pool(self, key: SlotKey) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            if len(self._pools) >= MAX_POOLS:
                self._forget_idle_pools()
            pool = self._pools[key] = _Pool(key)
        return pool

    def _forget_idle_pools(self) -> None:
        """Pools with nothing running, waiting or pumping (made-up model names pile up)."""
        for key in [
            k
            for k, p in self._pools.items()
            if not p.in_use and not p.waiting and (p.pump is None or p.pump.done())
        ]:
            del self._pools[key]

    def _user(self, ticket: Ticket) -> _User:
        user = self._users.get(ticket.user)
        if user is None:
            if len(self._users) >= MAX_IDLE_USERS:
                self._forget_idle_users()
            user = self._users[ticket.user] = _User(ticket.roles)
        user.roles = ticket.roles
        user.weight, user.priority = self.policy.share_of(ticket.user, ticket.roles)
        return user

    def _forget_idle_users(self) -> None:
        for name in [n for n, u in self._users.items() if not u.waiting and not u.running]:
            del self._users[name]

    def _enqueue(self, pools: list[_Pool], user: _User, ticket: Ticket) -> _Waiter:
        if user.waiting == 0:
            # Not banked: a user who starts waiting competes from the current level.
            floor = min(
                (self._users[n].counter for n in self._backlogged), default=self.virtual_time
            )
            user.counter = max(user.counter, floor)
            self._backlogged.add(ticket.user)
        loop = asyncio.get_running_loop()
        self._seq += 1
        waiter = _Waiter(ticket, user, loop.create_future(), self._clock(), self._seq, pools)
        waiter.timer = loop.call_later(self.policy.queue_timeout, self._expire, pools[0], waiter)
        for pool in pools:
            pool.queues.setdefault(ticket.user, deque()).append(waiter)
            pool.waiting += 1
        user.waiting += 1
        self.waiting_total += 1
        return waiter

    def _unqueue(self, pool: _Pool, waiter: _Waiter) -> None:
        """Take a waiter out of every pool it waits in (dispatch, timeout, departure)."""
        waiter.queued = False
        if waiter.timer is not None:
            waiter.timer.cancel()
        name = waiter.ticket.user
        for each in waiter.pools:
            queue = each.queues[name]
            if queue[0] is waiter:
                queue.popleft()
            else:
                queue.remove(waiter)
            if not queue:
                del each.queues[name]
            each.waiting -= 1
        self.waiting_total -= 1
        waiter.user.waiting -= 1
        if waiter.user.waiting == 0:
            self._backlogged.discard(name)

    def _abandon(self, pool: _Pool, waiter: _Waiter) -> None:
        """The waiting client left: out of the queue, or, if a slot was just handed over,
        give it back untouched (Ollama never sees the request)."""
        if waiter.queued:
            self._unqueue(pool, waiter)
            for each in waiter.pools:
                self._dispatch(each)  # it may have blocked nobody, but keep it simple
        elif (
            waiter.future.done()
            and not waiter.future.cancelled()
            and waiter.future.exception() is None
        ):
            waiter.future.result().release(0)

    def _expire(self, pool: _Pool, waiter: _Waiter) -> None:
        if not waiter.queued:
            return
        self._unqueue(pool, waiter)
        waited = self._clock() - waiter.enqueued
        retry = self._retry_after(pool, pool.waiting)
        if not waiter.future.done():
            waiter.future.set_exception(QueueRejected("timeout", retry, waited))

    def _pick(self, pool: _Pool) -> _Waiter | None:
        best: _Waiter | None = None
        best_rank: tuple[float, float, int, int] | None = None
        for queue in pool.queues.values():
            head = queue[0]
            user = head.user
            rank = (-user.priority, user.counter, user.last_dispatch, head.seq)
            if best_rank is None or rank < best_rank:
                best, best_rank = head, rank
        return best

    def _pump(self, pool: _Pool) -> None:
        """Hand free slots of `pool` to the fairest waiters."""
        capacity = self.policy.slots_for(pool.key)
        while pool.waiting and (pool.in_use < capacity or capacity == 0):
            waiter = self._pick(pool)
            if waiter is None:
                return
            self._unqueue(pool, waiter)
            if waiter.future.done():  # cancelled by its departing client, not yet unqueued
                continue
            grant = self._grant(
                pool, waiter.user, waiter.ticket, waited=self._clock() - waiter.enqueued
            )
            waiter.future.set_result(grant)

    def _grant(
        self, pool: _Pool, user: _User, ticket: Ticket, *, waited: float, holder: str | None = None
    ) -> Grant:
        pool.in_use += 1
        user.running += 1
        self._dispatches += 1
        user.last_dispatch = self._dispatches
        self.virtual_time = max(self.virtual_time, user.counter)
        charged = ticket.estimate / user.weight
        if self._remote is not None:
            self._remote.charge(user, ticket.user, charged)
        user.counter += charged
        return Grant(self, pool, user, ticket, charged, self._clock(), waited, holder)

    def _release(
        self,
        pool: _Pool,
        user: _User,
        ticket: Ticket,
        charged: float,
        tokens: int | None,
        grant: Grant,
    ) -> None:
        pool.in_use -= 1
        user.running -= 1
        delta = 0.0
        if tokens is not None and tokens != ticket.estimate:
            # Reconcile with what Ollama reported: the counter reflects real tokens.
            delta = tokens / user.weight - charged
        if delta > 0:
            user.counter += delta
        if tokens != 0:
            served = self._clock() - grant.started
            pool.service_seconds += SERVICE_SMOOTHING * (served - pool.service_seconds)
        if self._remote is None:
            # A refund lands after the next dispatch is chosen: an estimate a little above
            # the real count must not put the releasing user back ahead of a newcomer
            # lifted to its level (it would then wait one generation more).
            self._pump(pool)
            if delta < 0:
                user.counter += delta
            return
        self._remote.release(pool, user, ticket.user, delta, grant._holder)

    def _retry_after(self, pool: _Pool, ahead: int) -> int:
        """Seconds until `ahead` waiters have been served, from recent service times."""
        slots = max(1, self.policy.slots_for(pool.key))
        rounds = math.ceil((ahead + 1) / slots)
        estimate = rounds * pool.service_seconds
        return int(min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, math.ceil(estimate))))
