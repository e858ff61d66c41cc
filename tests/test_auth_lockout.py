"""Lockout scoped to what is attacked: one user from one address, never the whole address.

Real gateways on real sockets in front of the fake Ollama. Several client addresses are
simulated from 127.0.0.1 through a trusted proxy (`X-Forwarded-For`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import aiohttp
import jwt
import pytest

from tests.auth_support import FAST_BCRYPT, FakeClock, authenticator, basic, bearer
from tests.metrics_support import scrape

KEY = "ogw_office-nat-key-0123456789abcdefghijklmnop"
SECRET = "an-hs256-secret-of-at-least-32-bytes!!"
PASSWORD = "correct horse"
WRONG = "Tr0ub4dor&3-wrong"


def office(fake: Any, lockout: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """alice (attacked), bob (active), carol (not seen yet), a key, JWTs."""
    hashed = FAST_BCRYPT.hash(PASSWORD)
    auth: dict[str, Any] = {
        "users": {name: {"password": hashed} for name in ("alice", "bob", "carol")},
        "api_keys": [
            {
                "name": "ci",
                "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                "roles": ["user", "admin"],
            }
        ],
        "jwt": {"algorithms": ["HS256"], "secret": SECRET},
    }
    if lockout is not None:
        auth["lockout"] = lockout
    return {"upstream": {"url": fake.url}, "auth": auth, **extra}


def token(sub: str = "svc") -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "exp": now + 600, "roles": ["user"]}, SECRET, "HS256")


async def status(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with http.get(f"{url}/api/tags", headers=headers) as r:
        return r.status, dict(r.headers), await r.json()


async def test_office_nat_one_attacked_user_locks_out_nobody_else(
    gateway_factory, fake, http, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.auth")
    gw = await gateway_factory(office(fake))  # default lockout: 10 failures / 60 s / 300 s
    assert (await status(http, gw.url, basic("bob", PASSWORD)))[0] == 200  # an active user
    hashes_before = authenticator(gw).basic.verifications

    # From the same address: 25 wrong passwords for alice, sent together.
    guesses = await asyncio.gather(
        *(status(http, gw.url, basic("alice", f"{WRONG}{i}")) for i in range(25))
    )
    codes = sorted(code for code, _, _ in guesses)
    assert codes == [401] * 10 + [429] * 15  # pending attempts counted from their start
    assert authenticator(gw).basic.verifications - hashes_before == 10  # max_failures hashes
    # 10 unknown users and 10 junk tokens.
    unknown = await asyncio.gather(
        *(status(http, gw.url, basic(f"nobody{i}", WRONG)) for i in range(10))
    )
    junk = await asyncio.gather(
        *(status(http, gw.url, bearer(f"junk-token-{i}")) for i in range(10))
    )
    assert [code for code, _, _ in unknown + junk] == [401] * 20

    # Everyone else on that address still gets in.
    assert (await status(http, gw.url, basic("bob", PASSWORD)))[0] == 200
    assert (await status(http, gw.url, basic("carol", PASSWORD)))[0] == 200  # cold: a hash
    assert (await status(http, gw.url, bearer(KEY)))[0] == 200
    assert (await status(http, gw.url, {"X-API-Key": KEY}))[0] == 200
    assert (await status(http, gw.url, bearer(token())))[0] == 200
    # The attacked user, right password included, is refused there.
    code, headers, body = await status(http, gw.url, basic("alice", PASSWORD))
    assert code == 429
    assert 200 <= int(headers["Retry-After"]) <= 300
    assert body == {"error": "too many failed logins; try again later"}

    # The block is logged with its scope, never a password; and counted once.
    blocked = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
    assert blocked == [
        "auth: user 'alice' blocked from 127.0.0.1 for 300s after 10 failed passwords"
    ]
    assert WRONG not in caplog.text and PASSWORD not in caplog.text
    metrics = await scrape(http, gw.url, headers=bearer(KEY))
    assert metrics.value("ollama_gateway_auth_lockouts_total", scope="user") == 1
    assert metrics.value("ollama_gateway_auth_lockouts_total", scope="address") == 0
    assert metrics.value("ollama_gateway_rate_limited_total", limit="locked_out") == 1


async def test_block_holds_for_block_seconds_then_lifts(gateway_factory, fake, http) -> None:
    clock = FakeClock()
    lockout = {"max_failures": 3, "window": 60, "block_seconds": 120}
    gw = await gateway_factory(office(fake, lockout), clock=clock)
    assert (await status(http, gw.url, basic("alice", PASSWORD)))[0] == 200  # now cached
    for i in range(3):
        assert (await status(http, gw.url, basic("alice", f"{WRONG}{i}")))[0] == 401
    before = authenticator(gw).basic.verifications
    # Cached or not, the right password is refused while blocked, and no hash is spent.
    code, headers, _ = await status(http, gw.url, basic("alice", PASSWORD))
    assert code == 429 and int(headers["Retry-After"]) == 120
    assert (await status(http, gw.url, basic("alice", "another guess")))[0] == 429
    assert authenticator(gw).basic.verifications == before
    clock.advance(119)
    assert (await status(http, gw.url, basic("alice", PASSWORD)))[0] == 429
    clock.advance(2)
    assert (await status(http, gw.url, basic("alice", PASSWORD)))[0] == 200


async def test_failures_outside_the_window_do_not_add_up(gateway_factory, fake, http) -> None:
    clock = FakeClock()
    gw = await gateway_factory(office(fake, {"max_failures": 3, "window": 60}), clock=clock)
    for _ in range(3):
        for i in range(2):
            assert (await status(http, gw.url, basic("alice", f"{WRONG}{i}")))[0] == 401
        clock.advance(61)
    assert (await status(http, gw.url, basic("alice", PASSWORD)))[0] == 200


async def test_unknown_names_slow_failures_then_stop_fresh_hashes_only(
    gateway_factory, fake, http
) -> None:
    clock = FakeClock()
    lockout = {"max_failures": 2, "window": 60, "block_seconds": 60, "address_max_failures": 20}
    gw = await gateway_factory(office(fake, lockout), clock=clock)
    assert (await status(http, gw.url, basic("bob", PASSWORD)))[0] == 200  # cached from now
    loop = asyncio.get_running_loop()

    async def timed(headers: dict[str, str]) -> tuple[int, float]:
        started = loop.time()
        code = (await status(http, gw.url, headers))[0]
        return code, loop.time() - started

    # Within one user's quota (max_failures) an address's failures are answered at once.
    first = [await timed(basic(f"nobody{i}", WRONG)) for i in range(2)]
    assert [code for code, _ in first] == [401, 401]
    assert max(seconds for _, seconds in first) < 0.5
    # Past it, each failed response is slowed (concurrently here, to keep the test short)...
    later = await asyncio.gather(*(timed(bearer(f"junk-{i}")) for i in range(3, 20)))
    assert {code for code, _ in later} == {401}
    assert min(seconds for _, seconds in later) >= 0.09
    # ...but successes never are.
    code, seconds = await timed(basic("bob", PASSWORD))
    assert code == 200 and seconds < 0.5

    # The 20th failure reaches the ceiling: this address may start no fresh hash.
    assert (await timed(basic("nobody-last", WRONG)))[0] == 401
    before = authenticator(gw).basic.verifications
    code, headers, body = await status(http, gw.url, basic("carol", PASSWORD))  # cold
    assert code == 429 and 1 <= int(headers["Retry-After"]) <= 60
    assert body == {"error": "too many failed logins from this address; try again later"}
    assert (await status(http, gw.url, basic("nobody-else", WRONG)))[0] == 429
    assert authenticator(gw).basic.verifications == before  # refused without hashing
    # Credentials that verify cheaply still pass: a cached password, a key, a token.
    assert (await status(http, gw.url, basic("bob", PASSWORD)))[0] == 200
    assert (await status(http, gw.url, bearer(KEY)))[0] == 200
    assert (await status(http, gw.url, bearer(token())))[0] == 200
    metrics = await scrape(http, gw.url, headers=bearer(KEY))
    assert metrics.value("ollama_gateway_auth_lockouts_total", scope="address") == 1
    clock.advance(61)
    assert (await status(http, gw.url, basic("carol", PASSWORD)))[0] == 200


async def test_lockout_off_never_refuses(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(office(fake, {"max_failures": 0}))
    codes = [(await status(http, gw.url, basic("alice", f"{WRONG}{i}")))[0] for i in range(12)]
    assert codes == [401] * 12
    assert (await status(http, gw.url, basic("alice", PASSWORD)))[0] == 200


async def test_a_reload_unblocks_no_one(gateway_factory, fake, http) -> None:
    from gateway.server import reload_config

    gw = await gateway_factory(office(fake, {"max_failures": 2}))
    for i in range(2):
        assert (await status(http, gw.url, basic("alice", f"{WRONG}{i}")))[0] == 401
    assert await reload_config(gw.app, gw.config_path) is True
    assert (await status(http, gw.url, basic("alice", PASSWORD)))[0] == 429
    assert (await status(http, gw.url, basic("bob", PASSWORD)))[0] == 200


@pytest.mark.parametrize("concurrency", [100, 1000])
async def test_a_concurrent_burst_costs_max_failures_hashes(
    gateway_factory, fake, concurrency: int
) -> None:
    gw = await gateway_factory(office(fake))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=60)
    ) as burst:
        codes = await asyncio.gather(
            *(status(burst, gw.url, basic("alice", f"{WRONG}{i}")) for i in range(1000))
        )
    counts = {code: [c for c, _, _ in codes].count(code) for code in (401, 429)}
    assert counts == {401: 10, 429: 990}
    assert authenticator(gw).basic.verifications == 10
