"""Slots shared through a real redis-server: replicas together never exceed a model's slots.

Two gateway processes (or two apps) on one Redis in front of one fake Ollama. The fake runs
more requests at once than the gateway's slots (`parallel=8` against `slots: 2`), so its
`max_running` shows exactly how many the replicas let through together.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.keys import SCHEDULER
from gateway.scheduler.policy import DEFAULT_UPSTREAM
from gateway.scheduler.redis_slots import LEASE_ENV, RedisSlots, holders_key, line_keys
from tests.auth_support import FAST_BCRYPT, basic
from tests.conftest import GatewayFactory, GatewayProcess, gateway_process, until
from tests.fake_ollama import FakeOllama
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

MODEL = "llama3.2:latest"
USERS = {name: basic(name, "pw") for name in ("alice", "bob", "carol")}
STREAM = {"model": "llama3.2", "prompt": "hi"}
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
SLOTS = 2
HOLDERS = holders_key((DEFAULT_UPSTREAM, MODEL))
COUNTERS = "ogw:{sched}:vtc"


def config(fake: FakeOllama, store: str, **rate_limits: Any) -> dict[str, Any]:
    password = FAST_BCRYPT.hash("pw")
    return {
        "listen": "127.0.0.1:0",
        "upstream": {"url": fake.url, "slots": SLOTS},
        "shutdown_grace": 2,
        "auth": {"users": {name: {"password": password, "roles": ["user"]} for name in USERS}},
        # No limits: the admit stage never asks Redis, only the queue stage does.
        "roles": {"user": {"models": ["*"]}, "admin": {"models": ["*"]}},
        "rate_limits": {"store": store, **rate_limits},
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    server = await FakeOllama(parallel=8, chunk_delay=0.02).start()
    try:
        yield server
    finally:
        await server.close()


Serve = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """serve(config, env=...) -> a real `python -m gateway serve` process."""
    async with contextlib.AsyncExitStack() as processes:

        async def start(cfg: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
            return await processes.enter_async_context(gateway_process(cfg, tmp_path, env=env))

        yield start


async def generate(http: aiohttp.ClientSession, url: str, user: str, body: Any = STREAM) -> int:
    """One request read to its end: its status (a stream must end with done: true)."""
    async with http.post(url + "/api/generate", json=body, headers=USERS[user]) as response:
        raw = await response.read()
        if response.status == 200:
            assert json.loads(raw.splitlines()[-1])["done"] is True
        return response.status


def holders(redis: RedisServer) -> int:
    reply = redis.command("ZCARD", HOLDERS)
    return int(reply.strip().lstrip(b":"))


def in_line(redis: RedisServer) -> int:
    reply = redis.command("ZCARD", line_keys((DEFAULT_UPSTREAM, MODEL))[0])
    return int(reply.strip().lstrip(b":"))


def shared_counter(redis: RedisServer, user: str) -> float:
    reply = redis.command("HGET", COUNTERS, user).split(b"\r\n")
    return float(reply[1]) if reply[0] != b"$-1" else 0.0


async def test_two_gateway_processes_never_exceed_the_slots_together(
    redis_server: RedisServer, fake: FakeOllama, serve: Serve, http: aiohttp.ClientSession
) -> None:
    cfg = config(fake, redis_server.url)
    one, two = await asyncio.gather(serve(cfg), serve(cfg))
    assert await one.wait_line(r"fair queue: .*shared by every replica through")
    calls = [generate(http, (one, two)[i % 2].url, ("alice", "bob")[i // 2 % 2]) for i in range(12)]
    assert await asyncio.gather(*calls) == [200] * 12
    assert len(fake.requests_to("/api/generate")) == 12
    assert fake.max_running[MODEL] == SLOTS  # each alone would have let 2 in: 4
    await until(lambda: holders(redis_server) == 0)  # every lease given back


async def test_the_slot_goes_round_the_replicas_with_waiters(
    redis_server: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A replica that releases a slot cannot take it straight back while another waits."""
    cfg = config(fake, redis_server.url)
    cfg["upstream"]["slots"] = 1
    one, two = await gateway_factory(cfg), await gateway_factory(cfg)
    fake.hang_after_chunks = 1
    first = await http.post(one.url + "/api/generate", json=STREAM, headers=USERS["alice"])
    await fake.wait_for(lambda: fake.running(MODEL) == 1)

    def call(gw: Any, user: str, i: int) -> Awaitable[int]:
        body = {**STREAM, "prompt": f"{user}-{i}"}
        return generate(http, gw.url, user, body)

    calls = [asyncio.ensure_future(call(one, "alice", i)) for i in range(4)]
    await until(lambda: one.app[SCHEDULER].waiting_total == 4)
    calls += [asyncio.ensure_future(call(two, "bob", i)) for i in range(4)]
    await until(lambda: two.app[SCHEDULER].waiting_total == 4)
    await until(lambda: in_line(redis_server) == 1)  # two asked (one waits on its own slot)
    fake.resume()
    first.close()
    assert await asyncio.gather(*calls) == [200] * 8
    order = [g.request.json["prompt"].split("-")[0] for g in fake.grants[1:]]
    assert order == ["bob", "alice"] * 4
    assert fake.max_running[MODEL] == 1


async def test_waiting_on_another_replica_departures_and_timeouts_reach_no_ollama(
    redis_server: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    cfg = config(fake, redis_server.url)
    cfg["upstream"]["slots"] = 1
    cfg["scheduler"] = {"queue_timeout": 1}
    one, two = await gateway_factory(cfg), await gateway_factory(cfg)
    fake.hang_after_chunks = 1
    held = await http.post(one.url + "/api/generate", json=STREAM, headers=USERS["alice"])
    await fake.wait_for(lambda: fake.running(MODEL) == 1)
    leaving = asyncio.ensure_future(generate(http, two.url, "bob"))
    await until(lambda: two.app[SCHEDULER].waiting_total == 1)
    leaving.cancel()  # its client leaves while two asks Redis for a slot
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await until(lambda: two.app[SCHEDULER].waiting_total == 0)
    async with http.post(two.url + "/api/generate", json=STREAM, headers=USERS["bob"]) as late:
        assert late.status == 503  # waited queue_timeout: Redis never had a free slot
        assert "Retry-After" in late.headers
    assert len(fake.requests_to("/api/generate")) == 1
    fake.resume()
    held.close()
    assert await generate(http, two.url, "bob") == 200
    await until(lambda: holders(redis_server) == 0)  # no lease leaked on the way


async def test_a_killed_replica_frees_its_slots_when_their_leases_end(
    redis_server: RedisServer, fake: FakeOllama, serve: Serve, http: aiohttp.ClientSession
) -> None:
    cfg = config(fake, redis_server.url)
    env = {LEASE_ENV: "1"}  # renewed every 1/3 s
    one, two = await asyncio.gather(serve(cfg, env), serve(cfg, env))
    fake.hang_after_chunks = 1
    held = [await http.post(one.url + "/api/generate", json=STREAM, headers=USERS["alice"])]
    held.append(await http.post(one.url + "/api/generate", json=STREAM, headers=USERS["bob"]))
    await fake.wait_for(lambda: fake.running(MODEL) == SLOTS)
    await asyncio.sleep(1.0)  # the leases have been renewed past their first expiry
    assert holders(redis_server) == SLOTS
    await one.kill()  # SIGKILL: nothing released; the fake sees its clients gone
    for response in held:
        response.close()
    await fake.wait_for(lambda: fake.running(MODEL) == 0)
    fake.hang_after_chunks = None
    killed = time.monotonic()
    assert await generate(http, two.url, "alice") == 200
    waited = time.monotonic() - killed
    # The dead replica's last renewal was at most 1/3 s before its death.
    assert 0.5 <= waited < 5
    assert fake.max_running[MODEL] == SLOTS
    assert len(fake.requests_to("/api/generate")) == 3


async def test_counters_are_the_same_on_every_replica(
    redis_server: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    cfg = config(fake, redis_server.url)
    one, two = await gateway_factory(cfg), await gateway_factory(cfg)
    used = sum(fake.usage)  # prompt + completion tokens the fake reports
    expected = 0.0
    for gw in (one, two, two, one):
        assert await generate(http, gw.url, "alice", GENERATE) == 200
        expected += used
        scheduler = gw.app[SCHEDULER]
        await until(lambda s=scheduler, e=expected: s.counter("alice") == e)  # type: ignore[misc]
        assert shared_counter(redis_server, "alice") == expected
    assert shared_counter(redis_server, "bob") == 0.0


async def test_a_replica_orders_its_queue_by_what_users_used_on_other_replicas(
    redis_server: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    cfg = config(fake, redis_server.url)
    cfg["upstream"]["slots"] = 1
    one, two = await gateway_factory(cfg), await gateway_factory(cfg)
    for _ in range(3):  # alice's usage, all of it on replica one
        assert await generate(http, one.url, "alice", GENERATE) == 200
    await until(lambda: shared_counter(redis_server, "alice") == 3 * sum(fake.usage))
    fake.hang_after_chunks = 1
    held = await http.post(two.url + "/api/generate", json=STREAM, headers=USERS["carol"])
    await fake.wait_for(lambda: fake.running(MODEL) == 1)
    calls = [asyncio.ensure_future(generate(http, two.url, "alice", {**GENERATE, "prompt": "a"}))]
    await until(lambda: two.app[SCHEDULER].waiting_total == 1)
    calls.append(asyncio.ensure_future(generate(http, two.url, "bob", {**GENERATE, "prompt": "b"})))
    await until(lambda: two.app[SCHEDULER].waiting_total == 2)
    assert two.app[SCHEDULER].counter("alice") == 0.0  # two has not asked Redis yet
    fake.resume()
    held.close()
    assert await asyncio.gather(*calls) == [200, 200]
    # Replica two never served alice before, yet bob goes first: the take that won the slot
    # brought her counter from Redis.
    assert [g.request.json["prompt"] for g in fake.grants[-2:]] == ["b", "a"]


async def test_redis_down_with_allow_falls_back_to_local_slots(
    own_redis: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(config(fake, own_redis.url, on_store_error="allow"))
    assert await generate(http, gw.url, "alice") == 200
    await asyncio.to_thread(own_redis.stop)
    calls = [generate(http, gw.url, ("alice", "bob")[i % 2]) for i in range(6)]
    assert await asyncio.gather(*calls) == [200] * 6
    assert fake.max_running[MODEL] == SLOTS  # the local slots still hold
    assert gw.app[SCHEDULER].store.on_store_error  # counted as a store error (metrics)


async def test_redis_down_with_deny_answers_503_then_recovers(
    own_redis: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(config(fake, own_redis.url, on_store_error="deny"))
    assert await generate(http, gw.url, "alice") == 200
    await asyncio.to_thread(own_redis.stop)
    async with http.post(gw.url + "/api/generate", json=STREAM, headers=USERS["bob"]) as denied:
        assert denied.status == 503
        assert denied.headers["Retry-After"] == "1"
        assert await denied.json() == {"error": "slot store unavailable; retry later"}
    assert len(fake.requests_to("/api/generate")) == 1  # Ollama never saw it
    await asyncio.to_thread(own_redis.start)

    async def served() -> bool:
        return await generate(http, gw.url, "bob") == 200

    await until(served, within=10, interval=0.1)  # takes fail fast for a second after a failure


# --- the store alone ---------------------------------------------------------------------


async def test_store_leases_are_renewed_while_held_and_expire_when_a_replica_stops(
    redis_server: RedisServer,
) -> None:
    key = (DEFAULT_UPSTREAM, MODEL)
    one, two = RedisSlots(redis_server.url, lease_seconds=0.5), RedisSlots(redis_server.url)
    try:
        held = [await one.take(key, 2, []) for _ in range(3)]
        assert [t.holder is not None for t in held] == [True, True, False]
        await asyncio.sleep(1.2)  # more than two leases: the heartbeat kept them
        assert (await two.take(key, 2, [])).holder is None
        assert held[0].holder is not None
        await one.give(key, held[0].holder, "", 0.0)
        # one has not asked for a second: out of the line, so two is first
        assert (await two.take(key, 2, [])).holder is not None
        await one.close()  # stops renewing without giving back: that lease expires
        start = time.monotonic()

        async def taken() -> bool:
            return (await two.take(key, 2, [])).holder is not None

        await until(taken, within=3, interval=0.05)
        assert 0.1 < time.monotonic() - start < 1.5
    finally:
        await two.close()


async def test_store_counters_take_the_floor_then_the_charge(redis_server: RedisServer) -> None:
    store = RedisSlots(redis_server.url)
    try:
        assert await store.charge("alice", 10.0, None) == 10.0
        assert await store.charge("alice", 5.0, 100.0) == 105.0  # lifted, then charged
        assert await store.charge("alice", -2.5, 50.0) == 102.5  # a floor never lowers
        taken = await store.take((DEFAULT_UPSTREAM, MODEL), 1, ["alice", "bob"])
        assert taken.holder is not None and taken.counters == {"alice": 102.5}
        assert await store.give((DEFAULT_UPSTREAM, MODEL), taken.holder, "alice", 1.5) == 104.0
        assert shared_counter(redis_server, "alice") == 104.0
    finally:
        await store.close()


async def test_a_refund_never_puts_the_releasing_user_ahead_with_a_shared_store(
    redis_server: RedisServer,
) -> None:
    """The in-memory rule (test_scheduler_core) holds with slots in Redis too: an estimate one
    token above Ollama's count must not let alice's next request pass bob, lifted to her level."""
    from gateway.scheduler import FairScheduler
    from tests.test_scheduler_core import policy, ticket

    scheduler = FairScheduler(policy(), store=RedisSlots(redis_server.url))
    try:
        first = await scheduler.acquire(ticket("alice", tokens=100))
        alice = asyncio.ensure_future(scheduler.acquire(ticket("alice", tokens=100)))
        await until(lambda: scheduler.waiting_total == 1)
        bob = asyncio.ensure_future(scheduler.acquire(ticket("bob", tokens=100)))
        await until(lambda: scheduler.waiting_total == 2)
        first.release(99)
        done, _ = await asyncio.wait({alice, bob}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {bob}, "bob goes next"
        (await bob).release(100)
        (await alice).release(100)
        await until(lambda: shared_counter(redis_server, "alice") == 199.0)
    finally:
        await scheduler.close()
