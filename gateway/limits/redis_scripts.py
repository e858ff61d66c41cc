"""Lua for the Redis store: each call is one atomic EVALSHA (one round trip).

The arithmetic mirrors `gateway.limits.core` operation for operation (both are IEEE
doubles), and numbers cross the boundary as '%.17g' strings, which round-trip exactly;
Lua's own tostring would keep only 14 digits. `now` is an argument so tests can inject a
clock; when it is empty the script reads the Redis server's clock, one clock for every
replica.

Keys (one principal; the {hash tag} keeps both in one cluster slot):
  KEYS[1]  hash  r = rpm TAT, m = tokens/minute TAT, d = tokens/day TAT
  KEYS[2]  zset  concurrency leases: member = lease id, score = expiry time
"""

from __future__ import annotations

# Shared by every Lua script of the project: number formatting and one clock (Redis TIME
# unless a test passes its own `now`), so replicas never compare their own clocks.
CLOCK = """
local function fmt(x) return string.format('%.17g', x) end
local function clock(arg)
  local now = tonumber(arg)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

PRELUDE = (
    CLOCK
    + """
local function keep_state(key, now, r, m, d)
  local horizon = math.max(r, m, d) - now
  if horizon > 0 then
    redis.call('PEXPIRE', key, math.ceil(horizon * 1000) + 1000)
  else
    redis.call('DEL', key)
  end
end
"""
)

# ARGV: now, rpm interval, rpm tolerance, epsilon, concurrency, lease, lease ttl,
#       tokens/minute limit, minute, tokens/day limit, day   ('' = limit not set)
# -> {admitted 0|1, now, r, m, d, inflight}   (the state *before* this admission)
ADMIT = (
    PRELUDE
    + """
local now = clock(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'r', 'm', 'd')
local r = tonumber(st[1]) or 0
local m = tonumber(st[2]) or 0
local d = tonumber(st[3]) or 0
local ok = true
local interval = tonumber(ARGV[2])
local new_r = r
if interval then
  new_r = math.max(r, now) + interval
  if new_r - now > tonumber(ARGV[3]) + tonumber(ARGV[4]) then ok = false end
end
local conc = tonumber(ARGV[5])
local inflight = 0
if conc then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', fmt(now))
  inflight = redis.call('ZCARD', KEYS[2])
  if inflight >= conc then ok = false end
end
if tonumber(ARGV[8]) and m - now >= tonumber(ARGV[9]) then ok = false end
if tonumber(ARGV[10]) and d - now >= tonumber(ARGV[11]) then ok = false end
if ok then
  if interval then
    redis.call('HSET', KEYS[1], 'r', fmt(new_r))
    keep_state(KEYS[1], now, new_r, m, d)
  end
  if conc then
    local ttl = tonumber(ARGV[7])
    redis.call('ZADD', KEYS[2], fmt(now + ttl), ARGV[6])
    redis.call('PEXPIRE', KEYS[2], math.ceil(ttl * 1000) + 1000)
  end
end
return {ok and 1 or 0, fmt(now), fmt(r), fmt(m), fmt(d), inflight}
"""
)

# ARGV: now, lease ('' = held no slot), tokens, tokens/minute limit, minute,
#       tokens/day limit, day
FINISH = (
    PRELUDE
    + """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local tokens = tonumber(ARGV[3])
if tokens <= 0 then return 0 end
local tpm, tpd = tonumber(ARGV[4]), tonumber(ARGV[6])
if not tpm and not tpd then return 0 end
local now = clock(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'r', 'm', 'd')
local r = tonumber(st[1]) or 0
local m = tonumber(st[2]) or 0
local d = tonumber(st[3]) or 0
if tpm then
  m = math.max(m, now) + tokens * tonumber(ARGV[5]) / tpm
  redis.call('HSET', KEYS[1], 'm', fmt(m))
end
if tpd then
  d = math.max(d, now) + tokens * tonumber(ARGV[7]) / tpd
  redis.call('HSET', KEYS[1], 'd', fmt(d))
end
keep_state(KEYS[1], now, r, m, d)
return 1
"""
)

# KEYS[1] = leases zset. ARGV: now, lease, lease ttl. A lease that already expired (and
# may have been handed to someone else) is not brought back.
RENEW = (
    PRELUDE
    + """
local now = clock(ARGV[1])
local ttl = tonumber(ARGV[3])
local changed = redis.call('ZADD', KEYS[1], 'XX', 'CH', fmt(now + ttl), ARGV[2])
if changed > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000) + 1000) end
return changed
"""
)
