"""One behavioural suite for every limiter store (memory, and a real redis-server).

Time comes from an injected clock that the tests move by hand: no sleeping to window edges.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import LimitsConfig
from gateway.limits import Decision, Limiter, StoreUnavailable
from gateway.limits.core import retry_after_header
from gateway.limits.memory import MemoryLimiter
from tests.conftest import free_port
from tests.redis_server import RedisServer


class FakeClock:
    """Seconds, moved only by the test. Starts at a wall-clock-like value."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeLimiter = Callable[..., Limiter]


@pytest.fixture(params=["memory", "redis"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    """make(clock) -> a fresh limiter of the store under test."""
    made: list[Limiter] = []
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    def factory(clock: FakeClock, **kw: Any) -> Limiter:
        if url is None:
            limiter: Limiter = MemoryLimiter(max_keys=kw.get("max_keys", 1000), clock=clock)
        else:
            from gateway.limits.redis import RedisLimiter

            limiter = RedisLimiter(url, clock=clock)
        made.append(limiter)
        return limiter

    yield factory
    for limiter in made:
        await limiter.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def admit_n(
    limiter: Limiter, n: int, limits: LimitsConfig, key: str = "alice"
) -> list[Decision]:
    return [await limiter.admit(key, limits, f"lease-{i}") for i in range(n)]


RPM = LimitsConfig(requests_per_minute=60, burst=3)


async def test_rate_allows_the_burst_then_one_per_interval(
    make: MakeLimiter, clock: FakeClock
) -> None:
    limiter = make(clock)
    first = await admit_n(limiter, 4, RPM)
    assert [d.allowed for d in first] == [True, True, True, False]
    refused = first[3]
    assert refused.limit == "requests_per_minute"
    assert refused.retry_after == pytest.approx(1.0)
    clock.advance(0.5)
    assert not (await limiter.admit("alice", RPM, "x")).allowed  # too early: still refused
    clock.advance(0.5)
    assert (await limiter.admit("alice", RPM, "x")).allowed
    assert not (await limiter.admit("alice", RPM, "x")).allowed


async def test_rate_is_smooth_across_any_window(make: MakeLimiter, clock: FakeClock) -> None:
    """No fixed window: 60 s of hammering admits rate + burst, never twice the rate."""
    limits = LimitsConfig(requests_per_minute=30, burst=5)
    limiter = make(clock)
    admitted_at: list[float] = []
    for _ in range(1200):  # a request every 0.1 s for 120 s
        if (await limiter.admit("alice", limits, "x")).allowed:
            admitted_at.append(clock.now)
        clock.advance(0.1)
    start = admitted_at[0]
    for t in admitted_at:  # every sliding 60-second window
        in_window = [a for a in admitted_at if t <= a < t + 60]
        if t + 60 <= start + 120:
            assert len(in_window) <= 30 + 5
    assert len(admitted_at) == pytest.approx(5 + 120 / 2, abs=1)


async def test_refused_requests_cost_nothing(make: MakeLimiter, clock: FakeClock) -> None:
    limits = LimitsConfig(requests_per_minute=60, burst=2, concurrency=1)
    limiter = make(clock)
    assert (await limiter.admit("alice", limits, "a")).allowed
    for _ in range(20):  # refused on concurrency: must not spend the rate
        assert (await limiter.admit("alice", limits, "b")).limit == "concurrency"
    await limiter.finish("alice", "a", 0, limits)
    assert (await limiter.admit("alice", limits, "c")).allowed


async def test_concurrency_slots_are_taken_and_given_back(
    make: MakeLimiter, clock: FakeClock
) -> None:
    limits = LimitsConfig(concurrency=2)
    limiter = make(clock)
    a, b, c = await admit_n(limiter, 3, limits)
    assert a.allowed and b.allowed
    assert not c.allowed and c.limit == "concurrency" and c.retry_after > 0
    await limiter.finish("alice", "lease-0", 0, limits)
    assert (await limiter.admit("alice", limits, "lease-3")).allowed
    assert not (await limiter.admit("alice", limits, "lease-4")).allowed


async def test_keys_are_independent(make: MakeLimiter, clock: FakeClock) -> None:
    limiter = make(clock)
    limits = LimitsConfig(requests_per_minute=60, burst=1)
    assert (await limiter.admit("alice", limits, "a")).allowed
    assert not (await limiter.admit("alice", limits, "a")).allowed
    assert (await limiter.admit("bob", limits, "b")).allowed


@pytest.mark.parametrize(
    ("limits", "name", "period"),
    [
        (LimitsConfig(tokens_per_minute=1000), "tokens_per_minute", 60.0),
        (LimitsConfig(tokens_per_day=1000), "tokens_per_day", 86_400.0),
    ],
)
async def test_token_budget_admits_while_budget_remains_and_charges_at_the_end(
    make: MakeLimiter, clock: FakeClock, limits: LimitsConfig, name: str, period: float
) -> None:
    limiter = make(clock)
    d = await limiter.admit("alice", limits, "a")
    assert d.allowed and d.quota is not None and d.quota.remaining == 1000
    await limiter.finish("alice", "a", 600, limits)
    d = await limiter.admit("alice", limits, "b")  # 400 left: still admitted
    assert d.allowed and d.quota is not None and d.quota.remaining == 400
    await limiter.finish("alice", "b", 900, limits)  # overshoots: charged anyway
    refused = await limiter.admit("alice", limits, "c")
    assert not refused.allowed and refused.limit == name
    # 1500 used of 1000: the budget refills at 1000/period, so 500 must drain first.
    assert refused.retry_after == pytest.approx(period * 0.5, rel=1e-6)
    clock.advance(refused.retry_after - period * 0.01)
    assert not (await limiter.admit("alice", limits, "d")).allowed
    clock.advance(period * 0.02)
    assert (await limiter.admit("alice", limits, "e")).allowed


async def test_the_limit_that_frees_last_is_named(make: MakeLimiter, clock: FakeClock) -> None:
    limits = LimitsConfig(requests_per_minute=60, burst=1, tokens_per_minute=100)
    limiter = make(clock)
    assert (await limiter.admit("alice", limits, "a")).allowed
    await limiter.finish("alice", "a", 150, limits)  # 30 s of token debt vs 1 s of rate
    refused = await limiter.admit("alice", limits, "b")
    assert refused.limit == "tokens_per_minute"
    assert refused.retry_after == pytest.approx(30.0)
    assert retry_after_header(refused.retry_after) == "30"


async def test_retry_after_is_honest(make: MakeLimiter, clock: FakeClock) -> None:
    """Waiting the advertised whole seconds is enough; waiting less is not."""
    limits = LimitsConfig(requests_per_minute=7, burst=1)
    limiter = make(clock)
    assert (await limiter.admit("alice", limits, "a")).allowed
    refused = await limiter.admit("alice", limits, "b")
    header = int(retry_after_header(refused.retry_after))
    assert header == math.ceil(60 / 7)
    clock.advance(refused.retry_after * 0.99)
    assert not (await limiter.admit("alice", limits, "c")).allowed
    clock.advance(header - refused.retry_after * 0.99)
    assert (await limiter.admit("alice", limits, "d")).allowed


async def test_quota_reports_the_tightest_limit(make: MakeLimiter, clock: FakeClock) -> None:
    limits = LimitsConfig(requests_per_minute=600, burst=100, tokens_per_minute=1000)
    limiter = make(clock)
    d = await limiter.admit("alice", limits, "a")
    assert d.quota is not None and (d.quota.limit, d.quota.remaining) == (600, 99)
    await limiter.finish("alice", "a", 950, limits)
    d = await limiter.admit("alice", limits, "b")
    assert d.quota is not None and (d.quota.limit, d.quota.remaining) == (1000, 50)
    assert d.quota.reset == pytest.approx(57.0)


async def test_unlimited_admits_everything(make: MakeLimiter, clock: FakeClock) -> None:
    limiter = make(clock)
    decisions = await admit_n(limiter, 50, LimitsConfig())
    assert all(d.allowed for d in decisions)
    assert decisions[0].quota is None


async def test_two_limiters_on_one_store_share_limits(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    from gateway.limits.redis import RedisLimiter

    one, two = (
        RedisLimiter(redis_server.url, clock=clock),
        RedisLimiter(redis_server.url, clock=clock),
    )
    try:
        limits = LimitsConfig(requests_per_minute=60, burst=2, concurrency=5)
        assert (await one.admit("alice", limits, "a")).allowed
        assert (await two.admit("alice", limits, "b")).allowed
        assert (await one.admit("alice", limits, "c")).limit == "requests_per_minute"
        assert (await two.admit("alice", limits, "d")).limit == "requests_per_minute"
    finally:
        await one.close()
        await two.close()


async def test_a_dead_replicas_slots_expire(redis_server: RedisServer, clock: FakeClock) -> None:
    from gateway.limits.redis import LEASE_SECONDS, RedisLimiter

    crashed, alive = (
        RedisLimiter(redis_server.url, clock=clock),
        RedisLimiter(redis_server.url, clock=clock),
    )
    try:
        limits = LimitsConfig(concurrency=1)
        assert (await crashed.admit("alice", limits, "held")).allowed  # never finished
        assert not (await alive.admit("alice", limits, "x")).allowed
        clock.advance(LEASE_SECONDS * 0.9)
        await alive.renew("alice", "held")  # a live stream renews: the slot stays taken
        clock.advance(LEASE_SECONDS * 0.9)
        assert not (await alive.admit("alice", limits, "x")).allowed
        clock.advance(LEASE_SECONDS * 0.2)  # no renewal since: the lease lapses
        assert (await alive.admit("alice", limits, "y")).allowed
        await alive.renew("alice", "held")  # a lapsed lease is not brought back
        assert not (await alive.admit("alice", limits, "z")).allowed
    finally:
        await crashed.close()
        await alive.close()


async def test_memory_store_is_bounded_and_forgets_idle_keys(clock: FakeClock) -> None:
    limiter = MemoryLimiter(max_keys=3, clock=clock)
    limits = LimitsConfig(requests_per_minute=60, burst=1)
    for i in range(10):
        assert (await limiter.admit(f"user{i}", limits, "a")).allowed
        assert len(limiter) <= 3
    clock.advance(120)  # everyone idle again
    await limiter.admit("fresh", limits, "a")
    assert len(limiter) <= 2  # idle entries swept from the cold end


async def test_memory_store_keeps_busy_state_while_room_remains(clock: FakeClock) -> None:
    limiter = MemoryLimiter(max_keys=100, clock=clock)
    limits = LimitsConfig(concurrency=1)
    assert (await limiter.admit("alice", limits, "a")).allowed
    clock.advance(3600)
    for i in range(50):
        await limiter.admit(f"user{i}", LimitsConfig(requests_per_minute=60), "a")
    assert not (await limiter.admit("alice", limits, "b")).allowed


async def test_unreachable_redis_raises_and_is_counted(clock: FakeClock) -> None:
    from gateway.limits.redis import RedisLimiter

    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", clock=clock)
    seen: list[int] = []
    limiter.on_store_error.append(lambda: seen.append(1))
    try:
        with pytest.raises(StoreUnavailable):
            await limiter.admit("alice", LimitsConfig(concurrency=1), "a")
        await limiter.finish("alice", "a", 10, LimitsConfig(concurrency=1))  # never raises
        assert limiter.store_errors == 2 and seen == [1, 1]
    finally:
        await limiter.close()


async def test_redis_restart_recovers_by_itself(
    own_redis: RedisServer,
    clock: FakeClock,
) -> None:
    import asyncio

    from gateway.limits.redis import RedisLimiter

    limiter = RedisLimiter(own_redis.url, clock=clock)
    limits = LimitsConfig(requests_per_minute=60, burst=5)
    try:
        assert (await limiter.admit("alice", limits, "a")).allowed
        await asyncio.to_thread(own_redis.stop)
        with pytest.raises(StoreUnavailable):
            await limiter.admit("alice", limits, "b")
        errors = limiter.store_errors
        assert errors >= 1
        await asyncio.to_thread(own_redis.start)  # empty again: scripts reloaded on demand
        assert (await limiter.admit("alice", limits, "c")).allowed
        assert limiter.store_errors == errors
    finally:
        await limiter.close()
