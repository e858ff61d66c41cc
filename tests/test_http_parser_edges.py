"""Where aiohttp answers before (or around) the pipeline, on raw sockets (issue 10).

- its parser's 400 for an oversized or invalid header quoted the bytes it failed on (the
  start of a credential): now a fixed JSON error;
- `Expect: 100-continue` got its 100 before authentication: now only once the body is read,
  after authentication and the route passed;
- an HTTP/0.9 request line reached Ollama's `/`: now refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from tests.conftest import ADMIN_KEY, ADMIN_KEY_ENTRY, GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama

SECRET = "SECRETTOKEN"
USER_KEY = "ogw_parser-tests-user-key-0123456789abcdef"
USER_KEY_ENTRY = {
    "name": "plain",
    "sha256": hashlib.sha256(USER_KEY.encode()).hexdigest(),
    "roles": ["user"],
}


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    return await gateway_factory(
        {"upstream": {"url": fake.url}, "auth": {"api_keys": [ADMIN_KEY_ENTRY, USER_KEY_ENTRY]}}
    )


async def connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.host_port.rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def everything(gw: RunningGateway, payload: bytes) -> bytes:
    """Send raw bytes; all the server answers until it closes the connection."""
    reader, writer = await connect(gw)
    try:
        writer.write(payload)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        # a credential past aiohttp's 8190-byte field limit
        f"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}{'A' * 9000}\r\n\r\n",
        # a token in a request line past the line limit
        f"GET /api/tags?key={SECRET}{'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n",
        # a header name aiohttp refuses, holding a credential
        f"GET /api/tags HTTP/1.1\r\nHost: x\r\nBad Header: Bearer {SECRET}\r\n\r\n",
    ],
    ids=["long-header", "long-line", "invalid-header"],
)
async def test_parser_errors_never_echo_the_request(gw: RunningGateway, request_bytes: str) -> None:
    answer = await everything(gw, request_bytes.encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"400"
    assert json.loads(body) == {"error": "bad request"}
    assert SECRET.encode() not in answer and b"Bearer" not in answer


EXPECT_GENERATE = (
    b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Expect: 100-continue\r\n"
)
GENERATE = b'{"model":"llama3.2","prompt":"hi","stream":false}'


@pytest.mark.parametrize(
    ("credential", "status"),
    [(None, b"401"), (f"Bearer {USER_KEY}", b"403"), ("Bearer wrong-key", b"401")],
)
async def test_no_100_continue_for_a_request_the_pipeline_refuses(
    gw: RunningGateway, fake: FakeOllama, credential: str | None, status: bytes
) -> None:
    """The refusal is the first thing the client hears; the body is never invited."""
    path = b"/api/pull" if status == b"403" else b"/api/generate"
    head = EXPECT_GENERATE.replace(b"/api/generate", path)
    if credential:
        head += f"Authorization: {credential}\r\n".encode()
    reader, writer = await connect(gw)
    try:
        writer.write(head + f"Content-Length: {len(GENERATE)}\r\n\r\n".encode())
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert first.split(b" ", 2)[1] == status
    assert fake.requests == []


async def test_100_continue_comes_after_the_pipeline_and_the_request_completes(
    gw: RunningGateway, fake: FakeOllama
) -> None:
    reader, writer = await connect(gw)
    try:
        credential = f"Authorization: Bearer {ADMIN_KEY}\r\n"
        writer.write(
            EXPECT_GENERATE + f"{credential}Content-Length: {len(GENERATE)}\r\n\r\n".encode()
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(GENERATE)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert final.split(b" ", 2)[1] == b"200"
    [seen] = fake.requests_to("/api/generate")
    assert "expect" not in {name.lower() for name in seen.headers}  # never forwarded


async def test_a_streamed_upload_gets_its_100_after_authorisation(
    gw: RunningGateway, fake: FakeOllama
) -> None:
    blob = b"layer-bytes"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    head = (
        f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(blob)}\r\n"
    ).encode()
    reader, writer = await connect(gw)
    try:
        writer.write(head + f"Authorization: Bearer {USER_KEY}\r\n\r\n".encode())
        refused = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert refused.split(b" ", 2)[1] == b"403"  # blobs are admin-only: no 100 first
    reader, writer = await connect(gw)
    try:
        writer.write(head + f"Authorization: Bearer {ADMIN_KEY}\r\n\r\n".encode())
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(blob)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert final.split(b" ", 2)[1] == b"201"
    assert fake.blobs[digest] == len(blob)


async def test_an_http_09_request_line_never_reaches_ollama(
    gw: RunningGateway, fake: FakeOllama
) -> None:
    answer = await everything(gw, b"GET /\r\n\r\n")
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"error": "HTTP/1.0 or later required"}
    assert fake.requests == []
