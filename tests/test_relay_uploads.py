"""Blob uploads stream through with flat memory; early upstream answers are relayed."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_KEY_ENTRY,
    GatewayFactory,
    RunningGateway,
    gateway_process,
    require_binary,
    run_command,
)
from tests.fake_ollama import FakeOllama

GIB = 1 << 30
BLOCK = 1 << 20

AUTH = {"api_keys": [ADMIN_KEY_ENTRY]}


def block(i: int) -> bytes:
    """Deterministic, non-repeating-looking content generated on the fly (never held whole)."""
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * (BLOCK // 32)


def digest_of(blocks: int) -> str:
    h = hashlib.sha256()
    for i in range(blocks):
        h.update(block(i))
    return "sha256:" + h.hexdigest()


async def generate(blocks: int) -> AsyncIterator[bytes]:
    for i in range(blocks):
        yield block(i)


@pytest.mark.slow
async def test_one_gib_upload_streams_with_bounded_gateway_memory(
    fake: FakeOllama, tmp_path: Path
) -> None:
    blocks = GIB // BLOCK
    digest = await asyncio.to_thread(digest_of, blocks)
    async with gateway_process({"upstream": {"url": fake.url}, "auth": AUTH}, tmp_path) as gw:
        rss_before = gw.vm_status("VmRSS")
        timeout = aiohttp.ClientTimeout(total=300)
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=ADMIN_HEADERS) as http,
            http.post(f"{gw.url}/api/blobs/{digest}", data=generate(blocks)) as r,
        ):
            assert r.status == 201, await r.text()
        peak = gw.vm_status("VmHWM")
    assert fake.blobs[digest] == GIB
    # The whole GiB passed through; the gateway's peak memory stayed small and flat.
    assert peak - rss_before < 64 * BLOCK, (rss_before, peak)
    assert peak < 160 * BLOCK


async def test_curl_upload_with_expect_continue_and_content_length(
    gateway: RunningGateway, fake: FakeOllama, tmp_path: Path
) -> None:
    curl = require_binary("curl")
    blob = tmp_path / "model.gguf"
    content = b"GGUF" + bytes(range(256)) * 4096
    blob.write_bytes(content)
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    code, out, err = await run_command(
        curl,
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-T",
        str(blob),
        "-H",
        f"Authorization: {ADMIN_HEADERS['Authorization']}",
        "-X",
        "POST",
        f"{gateway.url}/api/blobs/{digest}",
    )
    assert (code, out) == (0, "201"), err
    seen = fake.requests_to(f"/api/blobs/{digest}")[-1]
    assert seen.body_size == len(content)
    assert seen.headers.get("Content-Length") == str(len(content))
    assert "Expect" not in seen.headers  # answered by the gateway, not forwarded


async def test_chunked_upload_reaches_upstream_whole(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    digest = digest_of(8)
    async with admin_http.post(f"{gateway.url}/api/blobs/{digest}", data=generate(8)) as r:
        assert r.status == 201
    assert fake.blobs[digest] == 8 * BLOCK


async def test_blob_that_exists_is_answered_early_and_relayed(
    gateway: RunningGateway, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    digest = digest_of(2)
    fake.blobs[digest] = 2 * BLOCK  # Ollama answers 200 without reading the body
    async with admin_http.head(f"{gateway.url}/api/blobs/{digest}") as r:
        assert r.status == 200
    async with admin_http.post(f"{gateway.url}/api/blobs/{digest}", data=generate(64)) as r:
        assert r.status == 200


async def test_digest_mismatch_passes_through_as_400(
    gateway: RunningGateway, admin_http: aiohttp.ClientSession
) -> None:
    wrong = "sha256:" + "0" * 64
    async with admin_http.post(f"{gateway.url}/api/blobs/{wrong}", data=b"not that") as r:
        assert r.status == 400
        assert "digest mismatch" in (await r.json())["error"]


async def test_request_body_is_not_size_limited_for_blobs(
    gateway_factory: GatewayFactory, fake: FakeOllama, admin_http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        {"upstream": {"url": fake.url}, "auth": AUTH, "max_body_bytes": 4096}
    )
    digest = digest_of(3)
    async with admin_http.post(f"{gw.url}/api/blobs/{digest}", data=generate(3)) as r:
        assert r.status == 201
