"""The relay: every route passes through, chunk by chunk, with real clients."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import ollama
import openai
import pytest
from yarl import URL

from tests.conftest import ADMIN_HEADERS, ADMIN_KEY, ADMIN_KEY_ENTRY, GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama

# Cloud models named explicitly, so the listings this caller sees are complete.
AUTH = {"api_keys": [ADMIN_KEY_ENTRY]}
ROLES = {"admin": {"models": ["*", "*:cloud", "*-cloud"]}, "user": {"models": ["*"]}}
LISTINGS = ("/api/tags", "/api/ps", "/v1/models")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("HEAD", "/"),
        ("GET", "/api/version"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("GET", "/v1/models"),
        ("GET", "/no/such/route"),
        ("DELETE", "/api/tags"),
        ("HEAD", "/api/ps"),
    ],
)
async def test_status_headers_and_bytes_unchanged(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    admin_http: aiohttp.ClientSession,
    method: str,
    path: str,
) -> None:
    # Every route open to the admin, so unknown routes and methods reach Ollama's own 404/405.
    config = {
        "upstream": {"url": fake.url},
        "auth": AUTH,
        "roles": ROLES,
        "routes": [{"path": "/*", "roles": ["admin"]}],
    }
    gateway = await gateway_factory(config)
    async with admin_http.request(method, fake.url + path) as direct:
        direct_body = await direct.read()
    async with admin_http.request(method, gateway.url + path) as relayed:
        relayed_body = await relayed.read()
    assert relayed.status == direct.status
    assert relayed.headers.get("Content-Type") == direct.headers.get("Content-Type")
    if path not in LISTINGS:  # listings are rewritten per caller, so sent chunked
        assert relayed.headers.get("Content-Length") == direct.headers.get("Content-Length")
    if path != "/api/ps":  # /api/ps carries expiry times that move
        assert relayed_body == direct_body
    assert relayed.headers["X-Request-Id"]


async def test_query_string_and_method_pass_unchanged(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    target = URL(gateway.url + "/api/tags?b=2&a=%2F%20x", encoded=True)
    async with admin_http.get(target) as response:
        assert response.status == 200
    seen = fake.requests_to("/api/tags")[-1]
    assert seen.method == "GET"
    assert seen.query == "b=2&a=%2F%20x"


async def test_ollama_client_generate_and_chat_stream(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    async with ollama.AsyncClient(host=gateway.url, headers=ADMIN_HEADERS) as client:
        parts = [part async for part in await client.generate("llama3.2", "hi", stream=True)]
        assert len(parts) == fake.chunks + 1
        assert parts[-1].done and parts[-1].eval_count == fake.usage[1]
        assert parts[-1].prompt_eval_count == fake.usage[0]
        chat = [
            p
            async for p in await client.chat(
                "llama3.2", [{"role": "user", "content": "x"}], stream=True
            )
        ]
        assert "".join(p.message.content or "" for p in chat).strip()
        single = await client.chat("llama3.2", [{"role": "user", "content": "x"}], stream=False)
        assert single.done and single.eval_count == fake.usage[1]
        listed = await client.list()
        assert {m.model for m in listed.models} >= {"llama3.2:latest"}
        embedded = await client.embed("all-minilm", "hello")
        assert len(embedded.embeddings) == 1


async def test_pull_progress_stream_and_delete_with_body(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    async with ollama.AsyncClient(host=gateway.url, headers=ADMIN_HEADERS) as client:
        statuses = [p.status async for p in await client.pull("mistral", stream=True)]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        await client.delete("mistral")
        deleted = fake.requests_to("/api/delete")[-1]
        assert deleted.method == "DELETE" and deleted.json == {"model": "mistral"}


async def test_openai_sdk_streams_sse_to_done(gateway: RunningGateway, fake: FakeOllama) -> None:
    url = gateway.url + "/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key=ADMIN_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()


async def test_sse_bytes_are_identical_to_direct(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with admin_http.post(gateway.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()
    events = raw.split(b"\n\n")
    assert events[-2] == b"data: [DONE]" and events[-1] == b""
    assert all(e.startswith(b"data: ") for e in events[:-1])


async def test_first_chunk_arrives_while_upstream_still_streams(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    """No buffering: the upstream holds the stream open after one chunk; we still get it."""
    fake.hang_after_chunks = 1
    async with admin_http.post(
        gateway.url + "/api/generate", json={"model": "llama3.2", "prompt": "hi"}
    ) as response:
        line = await asyncio.wait_for(response.content.readline(), 5)
        assert json.loads(line)["done"] is False
        assert response.headers["Content-Type"] == "application/x-ndjson"
        assert "Content-Length" not in response.headers


async def test_chunks_are_not_collected(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    """With a delay between chunks, the client sees the first long before the last exists."""
    fake.chunks, fake.chunk_delay = 5, 0.25
    started = time.perf_counter()
    arrivals = []
    async with admin_http.post(
        gateway.url + "/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
    ) as response:
        async for _line in response.content:
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) == 6
    total = arrivals[-1]
    assert total >= 5 * 0.25 * 0.9
    assert arrivals[0] < total / 3  # the first chunk did not wait for the rest
