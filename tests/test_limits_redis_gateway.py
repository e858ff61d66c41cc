"""Limits shared through a real redis-server: two real gateway processes, and Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.keys import LIMITER
from tests.auth_support import FAST_BCRYPT, basic
from tests.conftest import GatewayFactory, RunningGateway, gateway_process
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

ALICE = basic("alice", "pw")
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
STREAM = {"model": "llama3.2", "prompt": "hi"}


def config(
    fake: FakeOllama, store: str, limits: dict[str, Any], **rate_limits: Any
) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "upstream": {"url": fake.url},
        "shutdown_grace": 2,
        "auth": {"users": {"alice": {"password": FAST_BCRYPT.hash("pw"), "roles": ["user"]}}},
        "roles": {"user": {"models": ["*"], "limits": limits}, "admin": {"models": ["*"]}},
        "rate_limits": {"store": store, **rate_limits},
    }


async def status_of(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "/api/generate", json=GENERATE, headers=ALICE) as response:
        await response.read()
        return response.status


Serve = Callable[[dict[str, Any]], Awaitable[str]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """serve(config) -> URL of a real `python -m gateway serve` process."""
    async with contextlib.AsyncExitStack() as processes:

        async def start(cfg: dict[str, Any]) -> str:
            return (await processes.enter_async_context(gateway_process(cfg, tmp_path))).url

        yield start


async def test_two_gateway_processes_share_one_limit(
    redis_server: RedisServer, fake: FakeOllama, serve: Serve, http: aiohttp.ClientSession
) -> None:
    cfg = config(fake, redis_server.url, {"requests_per_minute": 1, "burst": 3})
    one, two = await asyncio.gather(serve(cfg), serve(cfg))
    assert await status_of(http, one) == 200
    assert await status_of(http, two) == 200
    assert await status_of(http, one) == 200
    async with http.post(two + "/api/generate", json=GENERATE, headers=ALICE) as refused:
        assert refused.status == 429  # the burst of 3 was spent across both processes
        assert await refused.json() == {"error": "rate limit exceeded: requests_per_minute"}
        assert 50 <= int(refused.headers["Retry-After"]) <= 60
    assert len(fake.requests_to("/api/generate")) == 3


async def test_two_gateway_processes_share_concurrency_slots(
    redis_server: RedisServer, fake: FakeOllama, serve: Serve, http: aiohttp.ClientSession
) -> None:
    cfg = config(fake, redis_server.url, {"concurrency": 1})
    one, two = await asyncio.gather(serve(cfg), serve(cfg))
    fake.hang_after_chunks = 1
    held = await http.post(one + "/api/generate", json=STREAM, headers=ALICE)
    try:
        assert json.loads(await held.content.readline())["done"] is False
        async with http.post(two + "/api/generate", json=STREAM, headers=ALICE) as refused:
            assert refused.status == 429
            assert await refused.json() == {"error": "rate limit exceeded: concurrency"}
    finally:
        held.close()
    await fake.wait_client_gone()
    fake.hang_after_chunks = None
    # Process one releases the slot right after closing upstream (one Redis round trip
    # later); each refused attempt is itself a full round trip through process two.
    async with asyncio.timeout(10):
        while (status := await status_of(http, two)) == 429:
            pass
    assert status == 200


async def test_redis_outage_denies_then_the_gateway_recovers_by_itself(
    own_redis: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw: RunningGateway = await gateway_factory(
        config(fake, own_redis.url, {"requests_per_minute": 600, "concurrency": 2})
    )
    assert await status_of(http, gw.url) == 200
    await asyncio.to_thread(own_redis.stop)
    async with http.post(gw.url + "/api/generate", json=GENERATE, headers=ALICE) as denied:
        assert denied.status == 503
        assert denied.headers["Retry-After"] == "1"
        assert await denied.json() == {"error": "rate limit store unavailable"}
    assert gw.app[LIMITER].store_errors >= 1
    assert len(fake.requests_to("/api/generate")) == 1
    await asyncio.to_thread(own_redis.start)
    assert await status_of(http, gw.url) == 200


async def test_redis_outage_with_allow_lets_requests_through(
    own_redis: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(
        config(fake, own_redis.url, {"concurrency": 1}, on_store_error="allow")
    )
    await asyncio.to_thread(own_redis.stop)
    assert [await status_of(http, gw.url) for _ in range(3)] == [200, 200, 200]
    assert gw.app[LIMITER].store_errors == 3


async def test_a_client_leaving_mid_stream_frees_its_redis_slot(
    redis_server: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway_factory(config(fake, redis_server.url, {"concurrency": 1}))
    observed = Observed(gw.app)
    fake.hang_after_chunks = 1
    held = await http.post(gw.url + "/api/generate", json=STREAM, headers=ALICE)
    assert json.loads(await held.content.readline())["done"] is False
    assert await status_of(http, gw.url) == 429
    held.close()
    await observed.wait(2)  # observers run after the admit stage's release
    fake.hang_after_chunks = None
    assert await status_of(http, gw.url) == 200
