"""Admission control through the real gateway: Basic users, the fake Ollama, real clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aiohttp
import openai
import pytest

from gateway.auth.principal import Principal
from gateway.config import AuthConfig, GatewayConfig, LimitsConfig, RoleConfig, Secret, UserConfig
from gateway.keys import LIMITER
from gateway.limits.checks import check_limits
from gateway.limits.resolve import limits_for
from gateway.reload import Overrides, Reloader
from tests.auth_support import FAST_BCRYPT, FakeClock, basic
from tests.conftest import GatewayFactory, RunningGateway, free_port, until
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed

PASSWORD = "pw"
ALICE = basic("alice", PASSWORD)
BOB = basic("bob", PASSWORD)
API_KEY = "ogw-alice-test-key-0123456789"
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
STREAM = {"model": "llama3.2", "prompt": "hi"}
CHAT_V1 = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def config(fake: FakeOllama, limits: dict[str, Any], **extra: Any) -> dict[str, Any]:
    hashed = FAST_BCRYPT.hash(PASSWORD)
    return {
        # Limits alone (parallel streams of one model): the fair queue has its own tests.
        "upstream": {"url": fake.url, "slots": 0},
        "auth": {
            "users": {
                "alice": {"password": hashed, "roles": ["user"]},
                "bob": {"password": hashed, "roles": ["user"]},
            },
            "api_keys": [
                {
                    "name": "alice-key",
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "user": "alice",
                    "roles": ["user"],
                }
            ],
        },
        "roles": {"user": {"models": ["*"], "limits": limits}, "admin": {"models": ["*"]}},
        **extra,
    }


async def start(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    limits: dict[str, Any],
    clock: FakeClock | None = None,
    **extra: Any,
) -> RunningGateway:
    return await gateway_factory(config(fake, limits, **extra), clock=clock or FakeClock())


async def generate(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    headers: dict[str, str],
) -> aiohttp.ClientResponse:
    async with http.post(gw.url + "/api/generate", json=GENERATE, headers=headers) as response:
        await response.read()
        return response


# -- effective limits (pure) -------------------------------------------------------------


def _config(
    roles: dict[str, LimitsConfig], users: dict[str, tuple[list[str], LimitsConfig | None]]
) -> GatewayConfig:
    return GatewayConfig(
        roles={name: RoleConfig(models=("*",), limits=lim) for name, lim in roles.items()},
        auth=AuthConfig(
            users={
                name: UserConfig(password=Secret("x"), roles=tuple(r), limits=lim)
                for name, (r, lim) in users.items()
            }
        ),
    )


def test_several_roles_get_the_most_generous_value_and_user_values_override() -> None:
    cfg = _config(
        {
            "small": LimitsConfig(requests_per_minute=10, concurrency=1, tokens_per_day=1000),
            "big": LimitsConfig(requests_per_minute=100, burst=50, concurrency=4),
        },
        {
            "carol": (["small", "big"], LimitsConfig(concurrency=2, tokens_per_minute=7)),
            "dave": (["small", "big"], None),
        },
    )
    dave = limits_for(Principal("dave", frozenset({"small", "big"}), "basic"), cfg)
    assert dave.requests_per_minute == 100 and dave.burst == 50
    assert dave.concurrency == 4
    assert dave.tokens_per_day is None  # `big` sets no token budget: unlimited wins
    carol = limits_for(Principal("carol", frozenset({"small", "big"}), "basic"), cfg)
    assert carol.concurrency == 2 and carol.tokens_per_minute == 7  # the user's own values
    assert carol.requests_per_minute == 100  # unset by the user: the roles' value
    small = limits_for(Principal("gina", frozenset({"small"}), "jwt"), cfg)
    assert (small.requests_per_minute, small.burst, small.tokens_per_day) == (10, 1, 1000)
    nobody = limits_for(Principal("erin", frozenset({"unknown"}), "jwt"), cfg)
    assert nobody.requests_per_minute is None and nobody.concurrency is None


def test_a_user_rate_brings_its_own_default_burst() -> None:
    cfg = _config(
        {"user": LimitsConfig(requests_per_minute=600, burst=200)},
        {"frank": (["user"], LimitsConfig(requests_per_minute=60))},
    )
    frank = limits_for(Principal("frank", frozenset({"user"}), "basic"), cfg)
    assert (frank.requests_per_minute, frank.burst) == (60, 10)


def test_limit_values_are_checked() -> None:
    cfg = _config(
        {"user": LimitsConfig(requests_per_minute=0, burst=3), "other": LimitsConfig(burst=3)},
        {"hal": (["user"], LimitsConfig(burst=5, concurrency=0))},
    )
    paths = {p.path for p in check_limits(cfg)}
    assert paths == {
        "roles.user.limits.requests_per_minute",
        "roles.other.limits.burst",
        "auth.users.hal.limits.concurrency",
    }


# -- through the gateway -----------------------------------------------------------------


async def test_429_names_the_limit_and_really_stops_the_request(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    gw = await start(gateway_factory, fake, {"requests_per_minute": 60, "burst": 2}, clock)
    assert [(await generate(http, gw, ALICE)).status for _ in range(2)] == [200, 200]
    async with http.post(gw.url + "/api/generate", json=GENERATE, headers=ALICE) as refused:
        assert refused.status == 429
        assert await refused.json() == {"error": "rate limit exceeded: requests_per_minute"}
        assert refused.headers["Retry-After"] == "1"
    assert len(fake.requests_to("/api/generate")) == 2  # the third never left the gateway
    clock.advance(1.0)  # exactly what Retry-After promised
    assert (await generate(http, gw, ALICE)).status == 200


async def test_admitted_responses_carry_ratelimit_headers(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"requests_per_minute": 60, "burst": 3})
    async with http.post(gw.url + "/api/generate", json=STREAM, headers=ALICE) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"  # relayed stream
        assert response.headers["RateLimit-Limit"] == "60"
        assert response.headers["RateLimit-Remaining"] == "2"
        assert response.headers["RateLimit-Reset"] == "1"
        await response.read()


async def test_concurrency_slot_is_held_until_the_stream_ends_and_freed_when_client_leaves(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"concurrency": 1})
    observed = Observed(gw.app)
    fake.hang_after_chunks = 1
    first = await http.post(gw.url + "/api/generate", json=STREAM, headers=ALICE)
    assert json.loads(await first.content.readline())["done"] is False
    async with http.post(gw.url + "/api/generate", json=STREAM, headers=ALICE) as second:
        assert second.status == 429
        assert await second.json() == {"error": "rate limit exceeded: concurrency"}
    async with http.post(gw.url + "/api/generate", json=STREAM, headers=BOB) as bobs:
        assert bobs.status == 200  # bob has slots of his own
        await bobs.content.readline()
    await fake.wait_client_gone()
    first.close()  # the client goes away mid-stream: the handler is cancelled
    await fake.wait_client_gone()
    await observed.wait(3)  # alice's 429, bob's stream, alice's abandoned stream
    fake.hang_after_chunks = None
    assert (await generate(http, gw, ALICE)).status == 200  # the slot came back


async def test_token_budget_is_charged_with_upstream_usage(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"tokens_per_minute": 50})
    observed = Observed(gw.app)  # 26 prompt + 10 completion tokens per request
    assert (await generate(http, gw, ALICE)).status == 200
    await observed.wait(1)
    assert (await generate(http, gw, ALICE)).status == 200  # 14 tokens left: still admitted
    await observed.wait(2)
    assert observed.contexts[1].usage is not None and observed.contexts[1].usage.total == 36
    refused = await generate(http, gw, ALICE)
    assert refused.status == 429
    # 72 used of 50/min: 22 must refill at 50/60 per second -> 26.4 s
    assert refused.headers["Retry-After"] == "27"


async def test_v1_streams_never_count_as_zero_and_clients_see_their_own_stream(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    gw = await start(gateway_factory, fake, {"tokens_per_minute": 60})
    observed = Observed(gw.app)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=API_KEY, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert chunks and all(chunk.usage is None for chunk in chunks)
        assert all(chunk.choices for chunk in chunks)  # no extra `choices: []` chunk
        sent = fake.requests_to("/v1/chat/completions")[-1].json
        assert sent["stream_options"] == {"include_usage": True}  # asked upstream for usage
        (ctx,) = await observed.wait(1)
        assert ctx.usage is not None and ctx.usage.total == 36 and ctx.usage.model == "llama3.2"
        # A client that asks for usage gets it, and its body goes upstream unchanged.
        stream = await client.chat.completions.create(
            model="llama3.2",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        last = [chunk async for chunk in stream][-1]
        assert last.usage is not None and last.usage.total_tokens == 36
        await observed.wait(2)
        with pytest.raises(openai.RateLimitError) as refused:  # 72 tokens used of 60
            await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]
            )
        assert refused.value.response.headers["Retry-After"] == "12"
    finally:
        await client.close()


async def test_v1_completions_chunks_lose_the_injected_zero_usage(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"tokens_per_day": 1000})
    observed = Observed(gw.app)
    body = {"model": "llama3.2", "prompt": "hi", "stream": True}
    async with http.post(gw.url + "/v1/completions", json=body, headers=ALICE) as response:
        raw = await response.read()
    async with http.post(fake.url + "/v1/completions", json=body) as direct:
        expected = await direct.read()
    events, direct_events = raw.split(b"\n\n"), expected.split(b"\n\n")
    assert len(events) == len(direct_events) and events[-2] == b"data: [DONE]"
    for ours, theirs in zip(events[:-2], direct_events[:-2], strict=True):
        mine, upstream = json.loads(ours[6:]), json.loads(theirs[6:])
        assert "usage" not in mine
        assert list(mine) == list(upstream)  # same members in the same order
    (ctx,) = await observed.wait(1)
    assert ctx.usage is not None and ctx.usage.total == 36


async def test_limits_key_on_the_user_never_on_credentials_or_addresses(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"requests_per_minute": 60, "burst": 1})
    assert (await generate(http, gw, ALICE)).status == 200
    assert (await generate(http, gw, ALICE)).status == 429
    # Another credential of the same user, or a forged client address: the same quota.
    assert (await generate(http, gw, {"Authorization": f"Bearer {API_KEY}"})).status == 429
    assert (await generate(http, gw, {**ALICE, "X-Forwarded-For": "203.0.113.9"})).status == 429
    assert (await generate(http, gw, basic("alice", "junk"))).status == 401  # no fresh quota
    assert (await generate(http, gw, BOB)).status == 200


async def test_anonymous_public_routes_are_not_limited_per_principal(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    routes = [{"path": "/api/generate", "methods": ["POST"], "public": True}]
    gw = await start(gateway_factory, fake, {"requests_per_minute": 60, "burst": 1}, routes=routes)
    statuses = [(await generate(http, gw, {})).status for _ in range(5)]
    assert statuses == [200] * 5


async def test_counters_survive_a_reload(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"requests_per_minute": 60, "burst": 1})
    assert (await generate(http, gw, ALICE)).status == 200
    assert (await generate(http, gw, ALICE)).status == 429
    reloader = Reloader(gw.app, gw.config_path, overrides=Overrides(), running=gw.config)
    assert await reloader.reload()
    assert (await generate(http, gw, ALICE)).status == 429


async def test_store_errors_are_visible_to_metrics(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(
        gateway_factory,
        fake,
        {"concurrency": 2},
        metrics={"public": True},
        rate_limits={"store": f"redis://127.0.0.1:{free_port()}/0"},
    )
    response = await generate(http, gw, ALICE)
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert gw.app[LIMITER].store_errors == 1
    assert not fake.requests_to("/api/generate")  # deny (the default) really denies
    async with http.get(gw.url + "/metrics") as scrape:
        text = await scrape.text()
    assert "ollama_gateway_rate_limit_store_errors_total 1.0" in text


async def test_many_parallel_requests_never_exceed_concurrency(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await start(gateway_factory, fake, {"concurrency": 3})
    fake.hang_after_chunks = 1
    responses = await asyncio.gather(
        *(http.post(gw.url + "/api/generate", json=STREAM, headers=ALICE) for _ in range(10))
    )
    try:
        assert sorted(r.status for r in responses) == [200] * 3 + [429] * 7
        assert len(fake.requests_to("/api/generate")) == 3
    finally:
        for r in responses:
            r.close()


async def test_a_failed_upstream_gives_the_slot_back(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    cfg = config(fake, {"concurrency": 1})
    cfg["upstream"] = {"url": f"http://127.0.0.1:{free_port()}"}  # nothing listens there
    gw = await gateway_factory(cfg, clock=FakeClock())
    statuses = [(await generate(http, gw, ALICE)).status for _ in range(3)]
    assert statuses == [502, 502, 502]  # never 429: each 502 released its slot


async def test_a_stream_cut_short_is_charged_what_it_streamed(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """No final record (the client left): the budget is charged per streamed record."""
    fake.chunks = 40
    fake.hang_after_chunks = 30  # the upstream holds the stream; the client leaves
    gw = await start(gateway_factory, fake, {"tokens_per_minute": 25})
    async with http.post(gw.url + "/api/generate", json=STREAM, headers=ALICE) as response:
        for _ in range(30):
            assert json.loads(await response.content.readline())["done"] is False
    await fake.wait_client_gone()
    await until(lambda: not gw.app[LIMITER].background)
    refused = await generate(http, gw, ALICE)
    assert refused.status == 429
    assert refused.headers["Retry-After"]
