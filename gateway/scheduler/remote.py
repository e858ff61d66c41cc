"""Dispatch with a remote slot store (Redis): several replicas share each model's slots.

The queue stays local and fair (`core.FairScheduler`), but a free slot by the local count is
only a chance: the chosen waiter must also win a lease from the store. Each pool with waiters
has a pump task that takes leases (retrying every POLL_SECONDS while the store says full, or
at once on a local release), and the users' counters mirror the store's, so a user is charged
the same everywhere. Store updates run in the background; their results land on the counters.

A friend of `core`: it drives the scheduler's own queues (pick, unqueue, grant), nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from gateway.limits import StoreUnavailable

if TYPE_CHECKING:
    from gateway.scheduler.core import FairScheduler, _Pool, _User, _Waiter

log = logging.getLogger("gateway.scheduler")

POLL_SECONDS = (0.05, 0.1)  # a remote store said full: retry after a random pause in this range
STORE_DOWN_RETRY_AFTER = 1


class RemoteDispatch:
    """The pumps, leases and counter updates of one scheduler whose store is remote."""

    def __init__(self, scheduler: FairScheduler) -> None:
        self._s = scheduler
        self._background: set[asyncio.Task[None]] = set()

    # --- what the scheduler calls -----------------------------------------------------------

    def kick(self, pool: _Pool) -> None:
        """Wake the pool's pump, or start one if it has waiters and none runs."""
        if pool.wake is None:
            pool.wake = asyncio.Event()
        pool.wake.set()
        if pool.waiting and (pool.pump is None or pool.pump.done()):
            pool.pump = asyncio.get_running_loop().create_task(self._run(pool))

    def charge(self, user: _User, name: str, charged: float) -> None:
        """A dispatch's charge. The lift to the waiting level travels with it, unless an
        earlier update is still on its way (it would be counted twice)."""
        floor = user.counter if user.syncing == 0 else None
        self.sync(user, self._s.store.charge(name, charged, floor))

    def release(
        self, pool: _Pool, user: _User, name: str, delta: float, holder: str | None
    ) -> None:
        """A slot given back, with the reconciliation `delta`. A refund (delta < 0) waits for
        the pump's next choice, as in the local path: an estimate a little above Ollama's count
        must not put the releasing user back ahead of a newcomer lifted to its level."""
        if delta < 0:
            pool.refunds.append((user, name, delta))
            if not pool.waiting:
                self.apply_refunds(pool)
        charge = max(delta, 0.0)
        store = self._s.store
        if holder is not None:  # the pump retakes once the lease is back
            self.sync(user, store.give(pool.key, holder, name, charge), pool)
        else:  # a local slot (the store was down): nothing to give back
            if charge:
                self.sync(user, store.charge(name, charge, None))
            self.kick(pool)

    async def close(self, pools: list[_Pool]) -> None:
        """Stop the pumps (their `leave` is sent) and let background updates land."""
        pumps = [pool.pump for pool in pools if pool.pump is not None]
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if self._background:
            await asyncio.wait(self._background, timeout=2.0)

    def apply_refunds(self, pool: _Pool) -> None:
        """Refunds held back while the pool's next waiter was chosen."""
        refunds, pool.refunds = pool.refunds, []
        for user, name, refund in refunds:
            user.counter += refund
            self.sync(user, self._s.store.charge(name, refund, None))

    # --- the pump ---------------------------------------------------------------------------

    async def _run(self, pool: _Pool) -> None:
        """While `pool` has waiters: when the local count allows, win a lease from the store
        and hand it to the fairest waiter; when the store says full, retry after a pause.
        Without waiters, it leaves the store's line of replicas and ends."""
        assert pool.wake is not None
        wake = pool.wake
        try:
            await self._take_for_waiters(pool, wake)
        finally:
            self.apply_refunds(pool)
            self.sync(None, self._s.store.leave(pool.key))

    async def _take_for_waiters(self, pool: _Pool, wake: asyncio.Event) -> None:
        scheduler = self._s
        while pool.waiting:
            wake.clear()  # any release or arrival from now on wakes the pauses below
            capacity = scheduler.policy.slots_for(pool.key)
            if capacity == 0:  # a reload turned the queue off
                scheduler._pump(pool)
                continue
            if pool.in_use >= capacity:
                await wake.wait()  # only a local release can help
                continue
            try:
                last = pool.waiting == 1  # then the replica leaves the line in the same call
                taken = await scheduler.store.take(pool.key, capacity, list(pool.queues), last)
            except StoreUnavailable:
                if not scheduler.fail_open:
                    self._refuse_all(pool)
                    continue
                holder = None  # fall back to a local slot
            except Exception:
                log.exception("slot store failed; refusing the waiters of %s", pool.key)
                self._refuse_all(pool)
                continue
            else:
                holder = taken.holder
                self._mirror_waiting(taken.counters)
                if holder is None:
                    await self._pause(wake, random.uniform(*POLL_SECONDS))
                    continue
            waiter = self._next_waiter(pool)
            if waiter is None:  # everyone left meanwhile
                if holder is not None:
                    self.sync(None, scheduler.store.give(pool.key, holder, "", 0.0))
                continue
            grant = scheduler._grant(
                pool,
                waiter.user,
                waiter.ticket,
                waited=scheduler._clock() - waiter.enqueued,
                holder=holder,
            )
            waiter.future.set_result(grant)
            self.apply_refunds(pool)

    @staticmethod
    async def _pause(wake: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)

    def _next_waiter(self, pool: _Pool) -> _Waiter | None:
        while True:
            waiter = self._s._pick(pool)
            if waiter is None:
                return None
            self._s._unqueue(pool, waiter)
            if not waiter.future.done():
                return waiter

    def _refuse_all(self, pool: _Pool) -> None:
        """The store is down and `on_store_error` is deny: every waiter of `pool` gets 503."""
        from gateway.scheduler.core import QueueRejected  # here: core imports this module

        now = self._s._clock()
        for queue in list(pool.queues.values()):
            for waiter in list(queue):
                self._s._unqueue(pool, waiter)
                if not waiter.future.done():
                    waiter.future.set_exception(
                        QueueRejected("slot_store", STORE_DOWN_RETRY_AFTER, now - waiter.enqueued)
                    )

    def _mirror_waiting(self, counters: dict[str, float]) -> None:
        """Counters of waiting users as the store has them (charges on other replicas)."""
        for name, value in counters.items():
            user = self._s._users.get(name)
            if user is not None and user.syncing == 0 and value > user.counter:
                user.counter = value

    # --- background store updates -----------------------------------------------------------

    def sync(
        self, user: _User | None, update: Awaitable[float | None], pool: _Pool | None = None
    ) -> None:
        """Run a store update in the background; the user's counter then mirrors the store's
        (unless another update is still on its way); a release then wakes the pool's pump."""
        if user is not None:
            user.syncing += 1
        task = asyncio.ensure_future(self._synced(user, update, pool))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _synced(
        self, user: _User | None, update: Awaitable[float | None], pool: _Pool | None
    ) -> None:
        value = None
        try:
            value = await update
        finally:
            if user is not None:
                user.syncing -= 1
                if value is not None and user.syncing == 0:
                    user.counter = value
            if pool is not None:
                self.kick(pool)
