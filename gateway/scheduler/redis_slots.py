"""Slots shared by every gateway replica through Redis, and the users' token counters.

Each (upstream, model) is a counting semaphore: a sorted set of holders scored by the
expiry of their lease. A take removes the expired holders and adds itself only if fewer
than the capacity remain, in one Lua script on the Redis server's clock (`TIME`), so
replicas with skewed clocks agree. A replica renews all its leases in one call every third
of the lease, so the slots of a replica that died free themselves when their leases end.
Overshoot is harmless (Ollama queues the extra): this is an efficiency lock, not a
correctness lock, and a lease that expired under a live request is not brought back.

Replicas that want a slot of a key stand in a line (a sorted set, by when they joined or
were last served): when k slots are free only the first k of the line may take one, and a
replica that took one goes to the back. So a replica that releases a slot cannot take it
straight back while another waits: the slots go round the replicas with waiters. A replica
stays in the line while it polls (every POLL_SECONDS) and leaves it when its waiters are
gone; one that stopped polling for STALE_SECONDS (it died) is dropped.

The virtual token counters are one hash, so a user is charged the same on every replica.
Every key shares the hash tag `{sched}` (one Redis Cluster slot: the scripts touch several).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence

from gateway.limits import StoreHealth, StoreUnavailable
from gateway.limits.middleware import next_lease_id
from gateway.limits.redis import KEY_PREFIX, STORE_ERRORS, connect, text
from gateway.limits.redis_scripts import PRELUDE
from gateway.scheduler.slots import SlotKey, Taken

log = logging.getLogger("gateway.scheduler")

LEASE_SECONDS = 30.0  # a dead replica's slots outlive it by at most this; renewed every third
LEASE_ENV = "OLLAMA_GATEWAY_SLOT_LEASE"  # overrides LEASE_SECONDS (tests kill replicas)
COUNTERS_TTL = 86_400  # the counters hash expires a day after the last charge
MAX_USERS_REFRESHED = 64  # counters read back per take
STALE_SECONDS = 1.0  # a replica in the line that has not polled for this long is dropped
# After a failed take, takes fail at once for this long: a Redis that hangs (socket timeouts)
# must not serialise every dispatch behind a timeout, whatever `on_store_error` says.
DOWN_SECONDS = 1.0

_COUNTERS = f"{KEY_PREFIX}{{sched}}:vtc"

_CHARGE_FN = """
local function charge(key, user, floor, delta)
  local v = tonumber(redis.call('HGET', key, user)) or 0
  local f = tonumber(floor)
  if f and f > v then v = f end
  v = v + tonumber(delta)
  redis.call('HSET', key, user, fmt(v))
  redis.call('EXPIRE', key, tonumber(ARGV[#ARGV]))
  return fmt(v)
end
"""

# KEYS[1] holders zset, KEYS[2] counters hash, KEYS[3] line zset (replica -> turn),
# KEYS[4] zset replica -> last poll.
# ARGV: replica, holder, capacity, lease ttl, stale seconds, last ('1': this take serves
#       the replica's last waiter, so it leaves the line), users to read back...,
#       counters ttl (unused here)
# -> {taken 0|1, {counter or false per user}}
TAKE = (
    PRELUDE
    + """
local now = clock('')
local replica = ARGV[1]
local ttl = tonumber(ARGV[4])
local keep = math.ceil(ttl * 1000) + 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', fmt(now - tonumber(ARGV[5])))
for _, r in ipairs(gone) do
  redis.call('ZREM', KEYS[3], r)
  redis.call('ZREM', KEYS[4], r)
end
redis.call('ZADD', KEYS[3], 'NX', fmt(now), replica)
redis.call('ZADD', KEYS[4], fmt(now), replica)
redis.call('PEXPIRE', KEYS[3], keep)
redis.call('PEXPIRE', KEYS[4], keep)
local taken = 0
local free = tonumber(ARGV[3]) - redis.call('ZCARD', KEYS[1])
if free > 0 and redis.call('ZRANK', KEYS[3], replica) < free then
  redis.call('ZADD', KEYS[1], fmt(now + ttl), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], keep)
  if ARGV[6] == '1' then
    redis.call('ZREM', KEYS[3], replica)
    redis.call('ZREM', KEYS[4], replica)
  else
    redis.call('ZADD', KEYS[3], 'XX', fmt(now), replica)  -- to the back of the line
  end
  taken = 1
end
local counters = {}
if #ARGV > 7 then counters = redis.call('HMGET', KEYS[2], unpack(ARGV, 7, #ARGV - 1)) end
return {taken, counters}
"""
)

# KEYS[1] line zset, KEYS[2] last-poll zset. ARGV: replica (it has no waiters left)
LEAVE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
"""

# KEYS[1] holders zset, KEYS[2] counters hash. ARGV: holder, user ('' = no charge), delta,
# counters ttl -> the user's counter after (or false)
GIVE = (
    PRELUDE
    + _CHARGE_FN
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] == '' then return false end
return charge(KEYS[2], ARGV[2], '', ARGV[3])
"""
)

# KEYS[1] counters hash. ARGV: user, floor ('' = none), delta, counters ttl -> counter after
CHARGE = PRELUDE + _CHARGE_FN + "return charge(KEYS[1], ARGV[1], ARGV[2], ARGV[3])\n"

# KEYS[i] the holders zset of lease i; ARGV: lease ttl, then holder i. A lease that already
# expired (its slot may be someone else's now) is not brought back. -> leases renewed
RENEW_ALL = (
    PRELUDE
    + """
local now = clock('')
local ttl = tonumber(ARGV[1])
local kept = 0
for i, key in ipairs(KEYS) do
  kept = kept + redis.call('ZADD', key, 'XX', 'CH', fmt(now + ttl), ARGV[i + 1])
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000) + 1000)
end
return kept
"""
)


def holders_key(key: SlotKey) -> str:
    upstream, model = key
    return f"{KEY_PREFIX}{{sched}}:slots:{upstream}:{model}"


def line_keys(key: SlotKey) -> list[str]:
    """The line of replicas waiting for `key`, and when each last polled."""
    upstream, model = key
    return [
        f"{KEY_PREFIX}{{sched}}:line:{upstream}:{model}",
        f"{KEY_PREFIX}{{sched}}:seen:{upstream}:{model}",
    ]


def lease_seconds_default() -> float:
    value = os.environ.get(LEASE_ENV)
    return float(value) if value else LEASE_SECONDS


class RedisSlots(StoreHealth):
    """The shared `SlotStore`. Store errors are counted and logged like the limiter's."""

    remote = True

    def __init__(self, url: str, *, lease_seconds: float | None = None) -> None:
        super().__init__()
        self.lease_seconds = lease_seconds or lease_seconds_default()
        self.client = connect(url)
        self._take = self.client.register_script(TAKE)
        self._give = self.client.register_script(GIVE)
        self._charge = self.client.register_script(CHARGE)
        self._renew = self.client.register_script(RENEW_ALL)
        self._leave = self.client.register_script(LEAVE)
        self.replica = os.urandom(8).hex()  # this replica's place in the lines
        self.held: dict[str, str] = {}  # holder -> its zset, for the heartbeat
        self._heartbeat: asyncio.Task[None] | None = None
        self._down_until = 0.0  # monotonic: takes fail fast until then
        self._in_line: set[SlotKey] = set()  # keys whose line this replica may stand in

    async def take(
        self, key: SlotKey, capacity: int, users: Sequence[str], last: bool = False
    ) -> Taken:
        if self._down_until and time.monotonic() < self._down_until:
            self.failed(StoreUnavailable("slot store down"))
            raise StoreUnavailable("slot store down (recent failure)")
        holder = next_lease_id()
        zset = holders_key(key)
        asked = list(users[:MAX_USERS_REFRESHED])
        args = [
            self.replica,
            holder,
            str(capacity),
            repr(self.lease_seconds),
            repr(STALE_SECONDS),
            "1" if last else "0",
            *asked,
            str(COUNTERS_TTL),
        ]
        keys = [zset, _COUNTERS, *line_keys(key)]
        try:
            taken, counters = await self._take(keys=keys, args=args)
        except STORE_ERRORS as error:
            self.failed(error)
            self._down_until = time.monotonic() + DOWN_SECONDS
            raise StoreUnavailable(str(error)) from error
        self._down_until = 0.0
        self.succeeded()
        known = {u: float(text(c)) for u, c in zip(asked, counters, strict=False) if c}
        if not int(taken):
            self._in_line.add(key)
            return Taken(None, known)
        if last:
            self._in_line.discard(key)
        else:
            self._in_line.add(key)
        self.held[holder] = zset
        if self._heartbeat is None:
            self._heartbeat = asyncio.create_task(self._keep_leases())
        return Taken(holder, known)

    async def give(self, key: SlotKey, holder: str, user: str, delta: float) -> float | None:
        zset = self.held.pop(holder, None) or holders_key(key)
        args = [holder, user if delta else "", repr(delta), str(COUNTERS_TTL)]
        try:
            value = await self._give(keys=[zset, _COUNTERS], args=args)
        except STORE_ERRORS as error:  # the lease expires by itself; the charge stays local
            self.failed(error)
            return None
        self.succeeded()
        return None if value is None else float(text(value))

    async def leave(self, key: SlotKey) -> None:
        if key not in self._in_line:
            return  # its last take left the line already: no round trip
        self._in_line.discard(key)
        try:
            await self._leave(keys=line_keys(key), args=[self.replica])
        except STORE_ERRORS as error:  # dropped from the line once stale
            self.failed(error)
            return
        self.succeeded()

    async def charge(self, user: str, delta: float, floor: float | None) -> float | None:
        args = [user, "" if floor is None else repr(floor), repr(delta), str(COUNTERS_TTL)]
        try:
            value = await self._charge(keys=[_COUNTERS], args=args)
        except STORE_ERRORS as error:
            self.failed(error)
            return None
        self.succeeded()
        return float(text(value))

    async def renew(self) -> None:
        if not self.held:
            return
        holders = list(self.held.items())
        args = [repr(self.lease_seconds), *(h for h, _ in holders)]
        try:
            kept = await self._renew(keys=[z for _, z in holders], args=args)
        except STORE_ERRORS as error:
            self.failed(error)
            return
        self.succeeded()
        if int(kept) < len(holders):
            log.warning("%d slot leases expired before renewal", len(holders) - int(kept))

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await self.renew()

    async def close(self) -> None:
        """Stop renewing and disconnect. Leases still held expire on their own."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self.background:
            await asyncio.wait(self.background, timeout=2.0)
        await self.client.aclose()
