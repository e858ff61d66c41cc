"""Lockout state shared through a real redis-server: two gateway processes, and outages."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.auth_support import FAST_BCRYPT, authenticator, basic, bearer
from tests.conftest import GatewayFactory, gateway_process
from tests.fake_ollama import FakeOllama
from tests.redis_server import RedisServer

pytestmark = pytest.mark.redis

PASSWORD = "correct horse"
KEY = "ogw_redis-lockout-key-0123456789abcdefghijkl"


def config(fake: FakeOllama, store: str, **lockout: Any) -> dict[str, Any]:
    hashed = FAST_BCRYPT.hash(PASSWORD)
    return {
        "upstream": {"url": fake.url},
        "auth": {
            "users": {name: {"password": hashed} for name in ("alice", "bob", "carol")},
            "api_keys": [{"name": "ci", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
            "lockout": {"max_failures": 10, "window": 60, "block_seconds": 300, **lockout},
        },
        # The limiter shares the store; with Redis down it must not hide the lockout's answers.
        "rate_limits": {"store": store, "on_store_error": "allow"},
    }


async def status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(f"{url}/api/tags", headers=headers) as r:
        await r.read()
        return r.status


async def test_two_gateway_processes_share_blocks_and_pending_attempts(
    redis_server: RedisServer, fake: FakeOllama, tmp_path: Path
) -> None:
    cfg = config(fake, redis_server.url)
    async with contextlib.AsyncExitStack() as stack:
        one, two = await asyncio.gather(
            stack.enter_async_context(gateway_process(cfg, tmp_path)),
            stack.enter_async_context(gateway_process(cfg, tmp_path)),
        )
        connector = aiohttp.TCPConnector(limit=200)
        http = await stack.enter_async_context(
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
        )
        # 200 wrong passwords for alice, half through each replica, all at once: the
        # reservations are atomic in Redis, so only max_failures of them are ever hashed.
        codes = await asyncio.gather(
            *(status(http, (one, two)[i % 2].url, basic("alice", f"wrong-{i}")) for i in range(200))
        )
        assert sorted(codes) == [401] * 10 + [429] * 190
        # Blocked on both replicas, right password included; everyone else gets in on both.
        for gw in (one, two):
            assert await status(http, gw.url, basic("alice", PASSWORD)) == 429
            assert await status(http, gw.url, basic("bob", PASSWORD)) == 200
            assert await status(http, gw.url, bearer(KEY)) == 200
        # Failures made on one replica count on the other.
        for i in range(5):
            assert await status(http, one.url, basic("carol", f"nope-{i}")) == 401
        for i in range(5):
            assert await status(http, two.url, basic("carol", f"nope-again-{i}")) == 401
        assert await status(http, one.url, basic("carol", PASSWORD)) == 429
        assert await asyncio.gather(one.stop(), two.stop()) == [0, 0]
    log = one.output + two.output
    # The replica that counted the 10th failure logs the block: scope, never a password.
    assert log.count("user 'carol' blocked from 127.0.0.1") == 1
    assert log.count("user 'alice' blocked from 127.0.0.1") == 1
    assert "wrong-" not in log and "nope-" not in log and PASSWORD not in log


async def test_redis_outage_falls_back_to_this_process(
    own_redis: RedisServer,
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.auth")
    gw = await gateway_factory(config(fake, own_redis.url, max_failures=3))
    assert await status(http, gw.url, basic("bob", PASSWORD)) == 200
    await asyncio.to_thread(own_redis.stop)
    # Logins keep working, and the lockout still applies, counted in this process.
    assert await status(http, gw.url, basic("carol", PASSWORD)) == 200
    assert [await status(http, gw.url, basic("alice", f"w{i}")) for i in range(4)] == [
        401,
        401,
        401,
        429,
    ]
    assert await status(http, gw.url, basic("bob", PASSWORD)) == 200
    unreachable = [r for r in caplog.records if "lockout store unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # once per outage, not once per request
    await asyncio.to_thread(own_redis.start)
    assert await status(http, gw.url, basic("bob", PASSWORD)) == 200
    assert any("lockout store reachable again" in r.getMessage() for r in caplog.records)
    assert authenticator(gw).lockout.enabled
