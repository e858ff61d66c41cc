"""The in-process store: one replica's limits, in a bounded LRU map.

Every method runs without awaiting, so each call is atomic on the event loop and a
cancelled request can never interrupt a release halfway.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from gateway.config import LimitsConfig
from gateway.limits import Clock, Decision, StoreHealth
from gateway.limits.core import State, charge, evaluate

log = logging.getLogger("gateway.limits")

# Idle entries looked at per admission: keeps eviction O(1) per request.
SWEEP_PER_CALL = 2


class MemoryLimiter(StoreHealth):
    remote = False
    lease_seconds: float | None = None

    def __init__(self, *, max_keys: int, clock: Clock | None = None) -> None:
        super().__init__()
        self.max_keys = max(1, max_keys)
        self.clock: Clock = clock or time.monotonic
        self._entries: OrderedDict[str, State] = OrderedDict()
        self.evicted_busy = 0  # entries dropped while still counting (memory bound reached)

    def __len__(self) -> int:
        return len(self._entries)

    async def admit(self, key: str, limits: LimitsConfig, lease: str) -> Decision:
        now = self.clock()
        state = self._entry(key, now)
        decision, new_rpm_tat = evaluate(limits, state, now)
        if decision.allowed:
            state.rpm_tat = new_rpm_tat
            if limits.concurrency is not None:
                state.inflight += 1
        return decision

    async def finish(self, key: str, lease: str, tokens: int, limits: LimitsConfig) -> None:
        now = self.clock()
        state = self._entry(key, now)
        if limits.concurrency is not None and state.inflight > 0:
            state.inflight -= 1
        charge(limits, state, now, tokens)

    async def renew(self, key: str, lease: str) -> None:
        return None  # slots live exactly as long as this process: nothing to renew

    async def close(self) -> None:
        self._entries.clear()

    def _entry(self, key: str, now: float) -> State:
        entries = self._entries
        state = entries.get(key)
        if state is not None:
            entries.move_to_end(key)
            return state
        self._evict(now)
        state = entries[key] = State()
        return state

    def _evict(self, now: float) -> None:
        """Forget idle entries from the cold end; past `max_keys`, forget the coldest anyway."""
        entries = self._entries
        for _ in range(SWEEP_PER_CALL):
            if not entries:
                return
            key, oldest = next(iter(entries.items()))
            if oldest.inflight or oldest.horizon() > now:
                break
            del entries[key]  # idle: forgetting it changes no decision
        while len(entries) >= self.max_keys:
            key, oldest = entries.popitem(last=False)
            if oldest.inflight or oldest.horizon() > now:
                self.evicted_busy += 1
                if self.evicted_busy == 1 or self.evicted_busy % 10_000 == 0:
                    log.warning(
                        "rate_limits.memory_max_keys (%d) reached: forgetting active limit "
                        "state (%d so far); raise it or use redis",
                        self.max_keys,
                        self.evicted_busy,
                    )
