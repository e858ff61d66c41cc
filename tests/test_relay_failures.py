"""The relay when things go wrong: clients that leave, upstreams that die, hang or vanish."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import httpx
import ollama
import pytest

from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_KEY_ENTRY,
    GatewayFactory,
    RunningGateway,
    free_port,
    until,
)
from tests.fake_ollama import FakeOllama

AUTH = {"api_keys": [ADMIN_KEY_ENTRY]}


async def test_client_leaving_a_stream_closes_the_upstream_request(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    fake.chunks, fake.chunk_delay = 50, 0.05  # a slow stream
    response = await admin_http.post(
        gateway.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}
    )
    await response.content.readline()
    response.close()  # the client goes away mid-stream
    gone = await fake.wait_client_gone(timeout=5)
    assert gone.path == "/api/generate"


async def test_client_leaving_before_any_byte_closes_the_upstream_request(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    """A non-streaming request still 'thinking' (model loading) is cancelled too."""
    fake.first_byte_delay = 30
    task = asyncio.create_task(
        admin_http.post(
            gateway.url + "/api/generate",
            json={"model": "llama3.2", "prompt": "x", "stream": False},
        )
    )
    await until(lambda: fake.requests_to("/api/generate"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gone = await fake.wait_client_gone(timeout=5)
    assert gone.path == "/api/generate"


async def test_unreachable_upstream_is_502_json(
    gateway_factory: GatewayFactory, admin_http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        {"upstream": {"url": f"http://127.0.0.1:{free_port()}"}, "auth": AUTH}
    )
    async with admin_http.get(gw.url + "/api/tags") as response:
        assert response.status == 502
        assert response.headers["Content-Type"].startswith("application/json")
        assert await response.json() == {"error": "upstream unreachable"}


async def test_upstream_silent_past_read_timeout_is_504_json(
    gateway_factory: GatewayFactory, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    fake.first_byte_delay = 30
    gw = await gateway_factory({"upstream": {"url": fake.url, "read_timeout": 0.2}, "auth": AUTH})
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]}
    async with admin_http.post(gw.url + "/api/chat", json=body) as r:
        assert r.status == 504
        assert await r.json() == {"error": "upstream timed out"}


async def test_first_byte_timeout_allows_a_slow_model_load(
    gateway_factory: GatewayFactory, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    fake.first_byte_delay = 0.6  # a model loading: longer than read_timeout
    upstream = {"url": fake.url, "read_timeout": 0.3, "first_byte_timeout": 5}
    gw = await gateway_factory({"upstream": upstream, "auth": AUTH})
    async with admin_http.post(
        gw.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}
    ) as response:
        assert response.status == 200
        lines = [json.loads(line) async for line in response.content]
    assert lines[-1]["done"] is True


async def test_upstream_hanging_mid_stream_ends_the_client_stream(
    gateway_factory: GatewayFactory, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    fake.hang_after_chunks = 2
    upstream = {"url": fake.url, "read_timeout": 0.2, "first_byte_timeout": 5}
    gw = await gateway_factory({"upstream": upstream, "auth": AUTH})
    async with admin_http.post(
        gw.url + "/api/generate", json={"model": "llama3.2", "prompt": "x"}
    ) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 5)  # cut, never a clean end and never a hang


async def test_upstream_dying_mid_stream_is_an_error_for_the_ollama_client(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    fake.abort_mid_stream_after = 2
    async with ollama.AsyncClient(host=gateway.url, headers=ADMIN_HEADERS) as client:
        received = []
        # The exact class varies by httpx version (RemoteProtocolError, ReadError...).
        with pytest.raises(httpx.TransportError) as info:
            async with asyncio.timeout(5):
                async for part in await client.generate("llama3.2", "x", stream=True):
                    received.append(part)
        assert not isinstance(info.value, httpx.TimeoutException)  # cut, not a hang
        assert len(received) == 2 and not received[-1].done


async def test_ollama_mid_stream_error_line_passes_through(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    fake.fail_mid_stream_after = 1
    async with ollama.AsyncClient(host=gateway.url, headers=ADMIN_HEADERS) as client:
        with pytest.raises(ollama.ResponseError) as info:
            async for _ in await client.generate("llama3.2", "x", stream=True):
                pass
        assert "error was encountered" in str(info.value)


async def test_upstream_error_statuses_pass_through(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    async with ollama.AsyncClient(host=gateway.url, headers=ADMIN_HEADERS) as client:
        with pytest.raises(ollama.ResponseError) as info:
            await client.show("no-such-model")
        assert info.value.status_code == 404
        assert "not found" in info.value.error


async def test_readyz_probes_version_only(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    async with admin_http.get(gateway.url + "/healthz") as response:
        assert response.status == 200
    before = len(fake.requests)
    async with admin_http.get(gateway.url + "/readyz") as response:
        assert response.status == 200
    assert [r.path for r in fake.requests[before:]] == ["/api/version"]


async def test_readyz_is_503_when_upstream_is_down(
    gateway_factory: GatewayFactory, admin_http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        {"upstream": {"url": f"http://127.0.0.1:{free_port()}"}, "auth": AUTH}
    )
    async with admin_http.get(gw.url + "/readyz") as response:
        assert response.status == 503
        assert await response.json() == {"error": "upstream unavailable"}
