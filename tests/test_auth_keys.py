"""API keys, and every method through the real client libraries users run."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta

import jwt
import ollama
import openai
import pytest
from langchain_ollama import ChatOllama

from gateway.keys import OBSERVERS
from tests.auth_support import (
    CHAT,
    FAST_BCRYPT,
    FakeClock,
    authenticator,
    basic,
    bearer,
    config,
)

KEY = "ogw_test-key-0123456789abcdefghijklmnopqrstuvw"
SECRET = "an-hs256-secret-of-at-least-32-bytes!!"


def key_entry(key: str = KEY, **extra: object) -> dict[str, object]:
    return {"name": "ci-bot", "sha256": hashlib.sha256(key.encode()).hexdigest(), **extra}


def all_methods(fake, **extra: object) -> dict[str, object]:
    return config(
        fake,
        users={"alice": {"password": FAST_BCRYPT.hash("pw"), "roles": ["admin"]}},
        api_keys=[key_entry(user="robot", roles=["user"])],
        jwt={"algorithms": ["HS256"], "secret": SECRET},
        **extra,
    )


def hs_token(sub: str = "tess", **claims: object) -> str:
    payload = {
        "sub": sub,
        "roles": ["user"],
        "exp": datetime.now(UTC) + timedelta(minutes=5),
        **claims,
    }
    return jwt.encode(payload, SECRET, algorithm="HS256")


async def test_bearer_and_x_api_key(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(all_methods(fake))
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append(ctx.principal))
    for headers in (bearer(KEY), {"X-API-Key": KEY}):
        async with http.post(f"{gw.url}/api/chat", json=CHAT, headers=headers) as r:
            assert r.status == 200
    for principal in seen:
        assert principal.user == "robot"  # key.user: auth.users overrides apply to it
        assert principal.method == "api_key" and principal.credential_id == "ci-bot"
        assert principal.roles == frozenset({"user"})
    for headers in (bearer(KEY + "x"), {"X-API-Key": "ogw_unknown"}):
        async with http.post(f"{gw.url}/api/chat", json=CHAT, headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'Basic realm="ollama-gateway"'
    forwarded = fake.requests_to("/api/chat")
    assert len(forwarded) == 2
    for request in forwarded:
        assert "Authorization" not in request.headers and "X-API-Key" not in request.headers
        assert all(KEY not in value for value in request.headers.values())


async def test_key_user_defaults_to_its_name(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake, api_keys=[key_entry()]))
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append(ctx.principal))
    async with http.get(f"{gw.url}/api/tags", headers=bearer(KEY)) as r:
        assert r.status == 200
    assert seen[0].user == "ci-bot"


async def test_expired_key(gateway_factory, fake, http) -> None:
    clock = FakeClock()
    expires = datetime.fromtimestamp(clock.now + 60, UTC).isoformat()
    gw = await gateway_factory(config(fake, api_keys=[key_entry(expires=expires)]), clock=clock)
    reasons = []
    gw.app[OBSERVERS].append(lambda ctx: reasons.append((ctx.auth_method, ctx.error_reason)))
    async with http.get(f"{gw.url}/api/tags", headers=bearer(KEY)) as r:
        assert r.status == 200
    clock.advance(61)
    async with http.get(f"{gw.url}/api/tags", headers=bearer(KEY)) as r:
        assert r.status == 401
        assert await r.json() == {"error": "API key expired"}
    assert reasons[-1] == ("api_key", "expired_key")


async def test_failures_are_labelled_by_method(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(all_methods(fake))
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append((ctx.auth_method, ctx.error_reason)))
    for headers in (
        basic("alice", "bad"),
        bearer("ogw_nope"),
        bearer(hs_token(exp=1)),
        bearer("a.b.c"),
        {"Authorization": "Negotiate abc"},
    ):
        async with http.get(f"{gw.url}/api/tags", headers=headers) as r:
            assert r.status == 401
    assert seen == [
        ("basic", "bad_password"),
        ("api_key", "unknown_credentials"),
        ("jwt", "expired_token"),
        ("jwt", "invalid_token"),
        ("other", "unsupported_scheme"),
    ]


async def test_steady_state_is_fast(gateway_factory, fake) -> None:
    """Cached Basic, API key and JWT: well under a millisecond each on the event loop."""
    import time

    from multidict import CIMultiDict, CIMultiDictProxy

    gw = await gateway_factory(all_methods(fake))
    auth = authenticator(gw)
    for headers in (basic("alice", "pw"), bearer(KEY), bearer(hs_token())):
        proxy = CIMultiDictProxy(CIMultiDict(headers))
        await auth.authenticate(proxy, "127.0.0.1")  # warm: the one hash
        started = time.perf_counter()
        for _ in range(200):
            assert await auth.authenticate(proxy, "127.0.0.1") is not None
        assert (time.perf_counter() - started) / 200 < 0.001


# --- real clients ---------------------------------------------------------------------


async def test_ollama_client_headers_each_method(gateway_factory, fake) -> None:
    gw = await gateway_factory(all_methods(fake))
    for headers in (basic("alice", "pw"), bearer(KEY), {"X-API-Key": KEY}, bearer(hs_token())):
        async with ollama.AsyncClient(host=gw.url, headers=headers) as client:
            reply = await client.chat(model="llama3.2", messages=CHAT["messages"])
            assert reply.message.content
            assert (await client.list()).models
    async with ollama.AsyncClient(host=gw.url, headers=basic("alice", "nope")) as bad:
        with pytest.raises(ollama.ResponseError) as info:
            await bad.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 401
    assert info.value.error == "invalid credentials"


async def test_ollama_client_with_ollama_api_key(gateway_factory, fake, monkeypatch) -> None:
    gw = await gateway_factory(all_methods(fake))
    monkeypatch.setenv("OLLAMA_API_KEY", KEY)
    async with ollama.AsyncClient(host=gw.url) as client:  # sends the env var as Bearer
        stream = await client.generate(model="llama3.2", prompt="hi", stream=True)
        chunks = [c async for c in stream]
    assert chunks[-1].done
    (request,) = fake.requests_to("/api/generate")
    assert "Authorization" not in request.headers
    monkeypatch.setenv("OLLAMA_API_KEY", "ogw_wrong")
    async with ollama.AsyncClient(host=gw.url) as client:
        with pytest.raises(ollama.ResponseError) as info:
            await client.generate(model="llama3.2", prompt="hi")
    assert info.value.status_code == 401


async def test_openai_client_api_key(gateway_factory, fake) -> None:
    gw = await gateway_factory(all_methods(fake))
    for api_key in (KEY, hs_token()):
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=api_key, max_retries=0)
        try:
            reply = await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
            stream = await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            assert [c async for c in stream]
        finally:
            await client.close()
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="ogw_bad", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    finally:
        await client.close()


async def test_langchain_chat_ollama(gateway_factory, fake) -> None:
    gw = await gateway_factory(all_methods(fake))
    for headers in (bearer(KEY), basic("alice", "pw"), bearer(hs_token())):
        chat = ChatOllama(model="llama3.2", base_url=gw.url, client_kwargs={"headers": headers})
        try:
            reply = await chat.ainvoke("hi")
        finally:
            await chat._async_client.close()  # ChatOllama has no close of its own
        assert reply.content
    chat = ChatOllama(
        model="llama3.2", base_url=gw.url, client_kwargs={"headers": bearer("ogw_bad")}
    )
    try:
        with pytest.raises(ollama.ResponseError) as info:
            await chat.ainvoke("hi")
    finally:
        await chat._async_client.close()
    assert info.value.status_code == 401


async def test_langchain_credentials_in_base_url(gateway_factory, fake) -> None:
    gw = await gateway_factory(all_methods(fake))
    url = gw.url.replace("http://", "http://alice:pw@")
    chat = ChatOllama(model="llama3.2", base_url=url)
    try:
        assert (await chat.ainvoke("hi")).content
    finally:
        await chat._async_client.close()


async def test_no_key_material_in_logs(gateway_factory, fake, http, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = hs_token()
    gw = await gateway_factory(all_methods(fake))
    for headers in (bearer(KEY), {"X-API-Key": KEY + "z"}, bearer(token), bearer(token + "x")):
        async with http.get(f"{gw.url}/api/tags", headers=headers) as r:
            assert r.status in (200, 401)
    for secret in (KEY, token, SECRET):
        assert secret not in caplog.text
