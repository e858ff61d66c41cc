"""The lockout store in Redis: blocks and pending attempts shared by every replica.

Each call is one EVALSHA, so "check and reserve" is atomic across replicas: a burst spread
over several gateways still costs at most `max_failures` hashes per attacked user. The Lua
mirrors `MemoryLockoutStore` rule for rule. Pending attempts are leases (a sorted set
scored by expiry), so the reservations of a replica that died mid-hash free themselves.

Keys (one address; the {hash tag} keeps an address's keys in one cluster slot):
  ogw:lockout:{ADDRESS}:a     hash  w = window start, f = failures, b = blocked until
  ogw:lockout:{ADDRESS}:ap    zset  pending attempts of the address
  ogw:lockout:{ADDRESS}:u:USER / :up:USER   the same for one user from that address
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.auth.lockout_store import PENDING_LEASE, Checked, Rules, Settled, Verdict
from gateway.limits.redis_scripts import CLOCK

SOCKET_TIMEOUT: Final = 1.0  # a login waits on Redis: fail fast to the local fallback
STORE_ERRORS: Final = (RedisError, OSError, TimeoutError)

_PRELUDE = (
    CLOCK
    + """
local now = clock(ARGV[1])
local has_user = ARGV[2] == '1'
"""
)

# KEYS: address hash, address pending, user hash, user pending.
# ARGV: now, has_user, reserve, attempt, max_failures, ceiling, window, lease
# -> {verdict, retry_after}
CHECK = (
    _PRELUDE
    + """
local window = tonumber(ARGV[7])
local function load(h, z)
  local st = redis.call('HMGET', h, 'w', 'f', 'b')
  local w = tonumber(st[1]) or now
  local f = tonumber(st[2]) or 0
  local b = tonumber(st[3]) or 0
  if now - w > window then f = 0 end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', fmt(now))
  return f, b, redis.call('ZCARD', z)
end
local uf, ub, up = 0, 0, 0
if has_user then
  uf, ub, up = load(KEYS[3], KEYS[4])
  if ub > now then return {1, fmt(ub - now)} end
end
if ARGV[3] ~= '1' then return {0, '0'} end
local af, ab, ap = load(KEYS[1], KEYS[2])
if ab > now then return {2, fmt(ab - now)} end
if has_user and uf + up >= tonumber(ARGV[5]) then return {3, '1'} end
if af + ap >= tonumber(ARGV[6]) then return {4, '1'} end
local lease = tonumber(ARGV[8])
local ttl = math.ceil(lease * 1000) + 1000
redis.call('ZADD', KEYS[2], fmt(now + lease), ARGV[4])
redis.call('PEXPIRE', KEYS[2], ttl)
if has_user then
  redis.call('ZADD', KEYS[4], fmt(now + lease), ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ttl)
end
return {0, '0'}
"""
)

# KEYS as CHECK. ARGV: now, has_user, attempt ('' = never pending), failed,
#                      max_failures, ceiling, window, block_seconds
# -> {user failures, address failures, user blocked 0|1, address blocked 0|1}
SETTLE = (
    _PRELUDE
    + """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[3])
  if has_user then redis.call('ZREM', KEYS[4], ARGV[3]) end
end
if ARGV[4] ~= '1' then return {0, 0, 0, 0} end
local window, block = tonumber(ARGV[7]), tonumber(ARGV[8])
local function fail(h, limit)
  local st = redis.call('HMGET', h, 'w', 'f', 'b')
  local w = tonumber(st[1]) or now
  local f = tonumber(st[2]) or 0
  local b = tonumber(st[3]) or 0
  if now - w > window then w = now; f = 0 end
  f = f + 1
  local blocked = 0
  if f >= limit then b = now + block; w = now; f = 0; blocked = 1 end
  redis.call('HSET', h, 'w', fmt(w), 'f', f, 'b', fmt(b))
  redis.call('PEXPIRE', h, math.ceil((math.max(w + window, b) - now) * 1000) + 1000)
  return f, blocked
end
local uf, ub = 0, 0
if has_user then uf, ub = fail(KEYS[3], tonumber(ARGV[5])) end
local af, ab = fail(KEYS[1], tonumber(ARGV[6]))
return {uf, af, ub, ab}
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisLockoutStore:
    """Lockout counters in Redis (`rate_limits.store`); `clock` None: the server's clock."""

    def __init__(self, url: str, *, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1),  # one retry on a fresh connection, no backoff
            health_check_interval=0,
        )
        self._check = self.client.register_script(CHECK)
        self._settle = self.client.register_script(SETTLE)

    @staticmethod
    def keys(address: str, user: str | None) -> list[str]:
        base = f"ogw:lockout:{{{address}}}"
        name = user or ""
        return [f"{base}:a", f"{base}:ap", f"{base}:u:{name}", f"{base}:up:{name}"]

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    async def check(
        self, address: str, user: str | None, rules: Rules, *, reserve: bool, attempt: str
    ) -> Checked:
        args = [
            self._now(),
            "1" if user else "0",
            "1" if reserve else "0",
            attempt,
            str(rules.max_failures),
            str(rules.address_ceiling),
            repr(float(rules.window)),
            repr(PENDING_LEASE),
        ]
        reply = await self._check(keys=self.keys(address, user), args=args)
        return Checked(Verdict(int(reply[0])), float(_text(reply[1])))

    async def settle(
        self, address: str, user: str | None, rules: Rules, *, attempt: str, failed: bool
    ) -> Settled:
        args = [
            self._now(),
            "1" if user else "0",
            attempt,
            "1" if failed else "0",
            str(rules.max_failures),
            str(rules.address_ceiling),
            repr(float(rules.window)),
            repr(float(rules.block_seconds)),
        ]
        reply = await self._settle(keys=self.keys(address, user), args=args)
        return Settled(int(reply[0]), int(reply[1]), int(reply[2]) == 1, int(reply[3]) == 1)

    async def close(self) -> None:
        await self.client.aclose()
