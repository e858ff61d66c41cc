"""Series per user and model, auth failures and 429s, through the real gateway.

Real credentials, route classes, token accounting and limits all feed these series.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import aiohttp
import jwt

from tests.auth_support import basic
from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed, pbkdf2_hash, scrape

PASSWORD = "correct horse battery staple"
API_KEY = "og_test_" + "k" * 40
JWT_SECRET = "s" * 48


def config(url: str, **extra: Any) -> dict[str, Any]:
    digest = pbkdf2_hash(PASSWORD)
    return {
        "upstream": {"url": url},
        "auth": {
            "users": {
                "alice": {"password": digest, "roles": ["user"]},
                "ops": {"password": digest, "roles": ["admin"]},
            },
            "api_keys": [
                {
                    "name": "ci-bot",
                    "sha256": hashlib.sha256(API_KEY.encode()).hexdigest(),
                    "roles": ["user"],
                }
            ],
            "jwt": {"algorithms": ["HS256"], "secret": JWT_SECRET},
        },
        "metrics": {"public": True},
        **extra,
    }


def token(sub: str) -> str:
    now = int(time.time())
    claims = {"sub": sub, "roles": ["user"], "iat": now, "exp": now + 300}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def final_record(body: bytes) -> dict[str, Any]:
    """What the upstream reported: the last NDJSON record of a native stream."""
    record = json.loads(body.strip().splitlines()[-1])
    assert record["done"] is True
    return dict(record)


async def post(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    status: int = 200,
) -> bytes:
    async with http.post(gw.url + path, json=body, headers=headers) as response:
        data = await response.read()
        assert response.status == status, data
        return data


async def test_tokens_per_user_and_model_equal_what_ollama_reported(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(fake.url))
    observed = Observed(gw.app)
    fake.usage = (26, 10)
    generated = final_record(
        await post(
            http,
            gw,
            "/api/generate",
            {"model": "llama3.2", "prompt": "hi"},
            basic("alice", PASSWORD),
        )
    )
    fake.usage = (7, 3)
    chatted = json.loads(
        await post(
            http,
            gw,
            "/api/chat",
            {
                "model": "qwen2.5:7b",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": False,
            },
            {"X-API-Key": API_KEY},
        )
    )
    fake.usage = (11, 5)
    sse = await post(
        http,
        gw,
        "/v1/chat/completions",
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"Authorization": f"Bearer {API_KEY}"},
    )
    usage_events = [
        json.loads(line[6:])
        for line in sse.decode().splitlines()
        if line.startswith("data: {") and '"usage":{' in line
    ]
    openai_usage = usage_events[-1]
    await observed.wait(3)
    s = await scrape(http, gw.url)

    tokens = "ollama_gateway_tokens_total"
    assert (
        s.value(tokens, user="alice", model=generated["model"], kind="prompt")
        == (generated["prompt_eval_count"])
    )
    assert (
        s.value(tokens, user="alice", model=generated["model"], kind="completion")
        == (generated["eval_count"])
    )
    assert (
        s.value(tokens, user="ci-bot", model=chatted["model"], kind="prompt")
        == (chatted["prompt_eval_count"])
    )
    assert (
        s.value(tokens, user="ci-bot", model=chatted["model"], kind="completion")
        == (chatted["eval_count"])
    )
    assert (
        s.value(tokens, user="ci-bot", model=openai_usage["model"], kind="prompt")
        == (openai_usage["usage"]["prompt_tokens"])
    )
    assert (
        s.value(tokens, user="ci-bot", model=openai_usage["model"], kind="completion")
        == (openai_usage["usage"]["completion_tokens"])
    )
    assert s.value(tokens) == 26 + 10 + 7 + 3 + 11 + 5
    # Native records carry eval_duration: tokens/s observed for them (not for /v1).
    assert s.value("ollama_gateway_generation_tokens_per_second_count") == 2
    speed = generated["eval_count"] / (generated["eval_duration"] / 1e9)
    assert (
        abs(
            s.value("ollama_gateway_generation_tokens_per_second_sum", model=generated["model"])
            - speed
        )
        < 1e-6
    )
    assert s.value("ollama_gateway_requests_total", user="alice", status="200") == 1
    assert s.value("ollama_gateway_requests_total", user="ci-bot", status="200") == 2


async def test_requests_per_user_and_route_class(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(fake.url))
    observed = Observed(gw.app)
    for _ in range(2):
        async with http.get(gw.url + "/api/tags", headers=basic("alice", PASSWORD)) as response:
            assert response.status == 200
    async with http.get(gw.url + "/api/tags", headers=basic("ops", PASSWORD)) as response:
        assert response.status == 200
    await post(
        http,
        gw,
        "/api/generate",
        {"model": "llama3.2", "prompt": "hi"},
        {"Authorization": f"Bearer {token('alice')}"},
    )
    contexts = await observed.wait(4)
    tags_class, generate_class = contexts[0].route_class, contexts[3].route_class
    assert tags_class != generate_class  # the route table tells reads from inference
    s = await scrape(http, gw.url)
    requests = "ollama_gateway_requests_total"
    assert s.value(requests, user="alice", route_class=tags_class, method="GET") == 2
    assert s.value(requests, user="ops", route_class=tags_class) == 1
    # A JWT naming a configured user is labelled with it.
    assert s.value(requests, user="alice", route_class=generate_class, method="POST") == 1


async def test_jwt_subjects_outside_the_config_never_become_labels(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(fake.url))
    observed = Observed(gw.app)
    for sub in ("visitor-1", "visitor-2", "visitor-3"):
        async with http.get(
            gw.url + "/api/tags", headers={"Authorization": f"Bearer {token(sub)}"}
        ) as response:
            assert response.status == 200
    await observed.wait(3)
    s = await scrape(http, gw.url)
    assert s.value("ollama_gateway_requests_total", user="jwt", status="200") == 3
    assert "visitor-" not in s.text


async def test_auth_failures_are_counted_by_method_and_reason(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(fake.url))
    observed = Observed(gw.app)
    bad = {
        "basic": basic("alice", "wrong password"),
        "api_key": {"X-API-Key": "og_test_unknown_key_0123456789"},
        "jwt": {
            "Authorization": "Bearer "
            + jwt.encode(
                {"sub": "alice", "exp": int(time.time()) + 60}, "x" * 48, algorithm="HS256"
            )
        },
    }
    for headers in bad.values():
        async with http.get(gw.url + "/api/tags", headers=headers) as response:
            assert response.status == 401
    async with http.get(gw.url + "/api/tags") as response:  # no credentials at all
        assert response.status == 401
    contexts = await observed.wait(4)
    s = await scrape(http, gw.url)
    failures = "ollama_gateway_auth_failures_total"
    for ctx, method in zip(contexts[:4], ["basic", "api_key", "jwt", "none"], strict=True):
        assert ctx.error_reason, "auth sets a reason label on every 401"
        assert s.value(failures, method=method, reason=ctx.error_reason) >= 1
    assert s.value(failures) == 4
    assert s.value("ollama_gateway_requests_total", status="401", user="anonymous") == 4
    for headers in bad.values():  # no credential ever reaches a label
        for value in headers.values():
            assert value.split()[-1] not in s.text
    assert not fake.requests_to("/api/tags")


async def test_rate_limit_rejections_are_counted_by_limit(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    limited = {
        "roles": {
            "user": {"models": ["*"], "limits": {"requests_per_minute": 1, "burst": 1}},
            "admin": {"models": ["*"]},
        }
    }
    gw = await gateway_factory(config(fake.url, **limited))
    observed = Observed(gw.app)
    statuses = []
    for _ in range(3):
        async with http.get(gw.url + "/api/tags", headers=basic("alice", PASSWORD)) as response:
            statuses.append(response.status)
            if response.status == 429:
                assert int(response.headers["Retry-After"]) >= 1
    contexts = await observed.wait(3)
    assert statuses == [200, 429, 429]
    assert contexts[1].error_reason == "requests_per_minute"
    s = await scrape(http, gw.url)
    assert s.value("ollama_gateway_rate_limited_total", limit="requests_per_minute") == 2
    assert s.value("ollama_gateway_requests_total", user="alice", status="429") == 2
