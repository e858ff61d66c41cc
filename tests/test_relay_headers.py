"""What Ollama receives: credentials, cookies, Origin and hop-by-hop headers never; ours added."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.conftest import ADMIN_HEADERS, ADMIN_KEY_ENTRY, GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama

AUTH = {"api_keys": [ADMIN_KEY_ENTRY]}


async def test_hop_by_hop_cookie_origin_and_spoofed_forwarding_are_stripped(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    headers = {
        "Cookie": "session=secret",
        "Origin": "https://evil.example.com",
        "Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA==",
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "named by Connection",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Forwarded-For": "6.6.6.6",
        "X-Real-IP": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "Host": "gateway.example.com",  # a loopback Ollama answers 403 to this Host
        "User-Agent": "ollama-python/0.6.2 (x86_64 linux) Python/3.12.3",
        "X-Custom": "kept",
    }
    async with admin_http.get(gateway.url + "/api/tags", headers=headers) as response:
        assert response.status == 200  # the fake's Host and Origin checks passed
        request_id = response.headers["X-Request-Id"]
    seen = fake.requests_to("/api/tags")[-1].headers
    for name in (
        "Cookie",
        "Origin",
        "Proxy-Authorization",
        "X-Private-Hop",
        "Keep-Alive",
        "TE",
        "X-Real-IP",
        "Forwarded",
    ):
        assert name not in seen, name
    assert seen["Host"] == fake.url.removeprefix("http://")
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Request-Id"] == request_id
    assert seen["User-Agent"] == headers["User-Agent"]  # /api/show reads it
    assert seen["X-Custom"] == "kept"


async def test_no_default_headers_are_invented(gateway: RunningGateway, fake: FakeOllama) -> None:
    """aiohttp's client would add User-Agent/Accept/Content-Type: the relay must not."""
    skip = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
    async with (
        aiohttp.ClientSession(skip_auto_headers=skip, headers=ADMIN_HEADERS) as s,
        s.post(gateway.url + "/api/show", data=b'{"model":"llama3.2"}') as r,
    ):
        assert r.status == 200
    seen = fake.requests_to("/api/show")[-1].headers
    assert "User-Agent" not in seen
    assert "Content-Type" not in seen
    assert "Accept" not in seen


async def test_sane_request_id_is_kept_and_insane_replaced(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    async with admin_http.get(
        gateway.url + "/api/version", headers={"X-Request-Id": "abc-123"}
    ) as r:
        assert r.headers["X-Request-Id"] == "abc-123"
    assert fake.requests_to("/api/version")[-1].headers["X-Request-Id"] == "abc-123"
    async with admin_http.get(
        gateway.url + "/api/version", headers={"X-Request-Id": "x" * 500 + "\u00e9"}
    ) as r:
        replaced = r.headers["X-Request-Id"]
    assert len(replaced) == 32 and replaced != "abc-123"


async def test_upstream_response_hop_by_hop_headers_are_not_relayed(
    gateway: RunningGateway, admin_http: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2", "input": "hi", "stream": False}
    async with admin_http.post(gateway.url + "/v1/responses", json=body) as r:
        assert r.status == 200
        assert r.headers.get("Connection", "keep-alive").lower() == "keep-alive"
        assert "Keep-Alive" not in r.headers


async def test_forwarded_proto_is_believed_only_from_trusted_proxies(
    gateway_factory: GatewayFactory, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    spoofed = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    untrusted = await gateway_factory({"upstream": {"url": fake.url}, "auth": AUTH})
    async with admin_http.get(untrusted.url + "/api/version", headers=spoofed) as r:
        assert r.status == 200
    seen = fake.requests_to("/api/version")[-1].headers
    assert (seen["X-Forwarded-Proto"], seen["X-Forwarded-For"]) == ("http", "127.0.0.1")
    trusted = await gateway_factory(
        {"upstream": {"url": fake.url}, "auth": AUTH, "trusted_proxies": ["127.0.0.1/32"]}
    )
    async with admin_http.get(trusted.url + "/api/version", headers=spoofed) as r:
        assert r.status == 200
    seen = fake.requests_to("/api/version")[-1].headers
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"


async def test_non_ascii_header_values_reach_ollama_byte_for_byte(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    """UTF-8 (and even invalid UTF-8) in a header value is relayed as sent, never a 500."""
    host, port = gateway.host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    values = ["日本語 title".encode(), b"caf\xc3\xa9", b"raw \xff\xfe bytes"]
    request = (
        b"GET /api/version HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
        + ADMIN_HEADERS["Authorization"].join([b"Authorization: ".decode(), ""]).encode()
        + b"\r\n"
        + b"".join(b"X-Title-%d: " % i + v + b"\r\n" for i, v in enumerate(values))
        + b"\r\n"
    )
    writer.write(request)
    status_line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert b" 200 " in status_line
    seen = fake.requests_to("/api/version")[-1].headers
    for i, value in enumerate(values):
        assert seen[f"X-Title-{i}"].encode("utf-8", "surrogateescape") == value
