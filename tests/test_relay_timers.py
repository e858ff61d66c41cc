"""Timers that measure the right thing (issue 10, item 4), on real sockets.

The first-byte timer is Ollama's time: it starts once the request body is sent. The body has
its own idle timer (`client_body_timeout`): 408 while nothing reached Ollama, else the upstream
request is reset (RST: Ollama must never see half a body end cleanly). Requests of methods
that carry no body never hold an upstream connection for one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import ADMIN_HEADERS, ADMIN_KEY, ADMIN_KEY_ENTRY, GatewayFactory, until
from tests.fake_ollama import FakeOllama

AUTH = {"api_keys": [ADMIN_KEY_ENTRY]}
PIECE = 20_000


class SilentUpstream:
    """Reads a request head and its body, never answers.

    With `read_body`, it stops reading after that many body bytes until `resume` is set.
    `ending` says how the gateway's connection ended: "reset" (RST), "eof" (a clean close),
    or "" while it is open.
    """

    def __init__(self, read_body: int | None) -> None:
        self.read_body = read_body
        self.heads: list[bytes] = []
        self.body = 0
        self.ending = ""
        self.ended = asyncio.Event()
        self.resume = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            while True:
                if self.read_body is not None and self.body >= self.read_body:
                    await self.resume.wait()  # takes no more: the gateway's buffers fill up
                data = await reader.read(65536)
                if not data:
                    self.ending = "eof"
                    break
                self.body += len(data)
        except ConnectionResetError:
            self.ending = "reset"
        finally:
            self.ended.set()
            writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response on a raw connection: status and body (Content-Length framed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def raw_head(method: str, path: str, length: int | None, *, auth: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test"]
    if auth:
        lines.append(f"Authorization: Bearer {ADMIN_KEY}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_an_upload_longer_than_the_first_byte_timeout_succeeds(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """A 600 kB blob at 200 kB/s takes 3 s; Ollama's first-byte budget is 2 s, and it is met."""
    data = bytes(range(256)) * (600_000 // 256)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    upstream = {"url": fake.url, "first_byte_timeout": 2, "read_timeout": 2}
    gw = await gateway_factory({"upstream": upstream, "auth": AUTH})

    async def throttled() -> AsyncIterator[bytes]:
        for at in range(0, len(data), PIECE):
            yield data[at : at + PIECE]
            await asyncio.sleep(PIECE / 200_000)  # the client's link: 200 kB/s

    started = time.monotonic()
    async with (
        aiohttp.ClientSession(headers=ADMIN_HEADERS) as http,
        http.post(f"{gw.url}/api/blobs/{digest}", data=throttled()) as response,
    ):
        assert response.status == 201, await response.text()
    assert time.monotonic() - started > 2.5  # the upload really outlasted the timer
    assert fake.blobs[digest] == len(data)


async def test_the_first_byte_timer_runs_once_the_body_is_sent(
    gateway_factory: GatewayFactory,
) -> None:
    """After a streamed body, an upstream that never answers still gets its 504."""
    upstream = SilentUpstream(read_body=None)
    url = await upstream.start()
    try:
        config = {"upstream": {"url": url, "first_byte_timeout": 0.5, "read_timeout": 60}}
        gw = await gateway_factory({**config, "auth": AUTH})
        digest = "sha256:" + "a" * 64
        async with (
            aiohttp.ClientSession(headers=ADMIN_HEADERS) as http,
            http.post(f"{gw.url}/api/blobs/{digest}", data=b"x" * 100_000) as response,
        ):
            assert response.status == 504
            assert await response.json() == {"error": "upstream timed out"}
        assert upstream.body == 100_000
    finally:
        await upstream.close()


async def test_a_json_body_that_stalls_is_408_and_never_reaches_ollama(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    gw = await gateway_factory(
        {"upstream": {"url": fake.url}, "auth": AUTH, "client_body_timeout": 0.3}
    )
    host, port = gw.host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw_head("POST", "/api/generate", 100) + b'{"model":')
        status, body = await read_response(reader)
        assert status == 408
        assert json.loads(body) == {"error": "request body timed out"}
        assert await asyncio.wait_for(reader.read(), 15) == b""  # and the connection closed
    finally:
        writer.close()
    assert fake.requests_to("/api/generate") == []


@pytest.mark.parametrize("how", ["stall", "hang_up"])
async def test_a_streamed_body_cut_short_resets_the_upstream_request(
    gateway_factory: GatewayFactory, how: str
) -> None:
    """What Ollama sees of a blob upload that stalls or breaks: a reset, never a clean end."""
    upstream = SilentUpstream(read_body=None)
    url = await upstream.start()
    try:
        gw = await gateway_factory(
            {"upstream": {"url": url}, "auth": AUTH, "client_body_timeout": 0.3}
        )
        host, port = gw.host_port.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        path = "/api/blobs/sha256:" + "b" * 64
        writer.write(raw_head("POST", path, 100_000) + b"y" * 1000)
        await writer.drain()
        if how == "stall":
            status, body = await read_response(reader)
            assert (status, json.loads(body)) == (408, {"error": "request body timed out"})
            assert await asyncio.wait_for(reader.read(), 15) == b""
        else:
            await until(lambda: upstream.body >= 1000)  # all of it is upstream, then...
            writer.transport.abort()  # the client's upload breaks
        await asyncio.wait_for(upstream.ended.wait(), 5)
        writer.close()
    finally:
        await upstream.close()
    assert upstream.body == 1000
    assert upstream.ending == "reset"


async def test_an_upstream_that_stops_taking_the_body_times_out(
    gateway_factory: GatewayFactory,
) -> None:
    """Sending the body up has a bound too (read_timeout): 504, and the request is reset."""
    upstream = SilentUpstream(read_body=1)  # reads the head and a byte, then nothing
    url = await upstream.start()
    try:
        gw = await gateway_factory({"upstream": {"url": url, "read_timeout": 0.5}, "auth": AUTH})
        host, port = gw.host_port.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        size = 256 << 20  # far more than the socket buffers between us hold

        async def send() -> None:
            writer.write(raw_head("POST", "/api/blobs/sha256:" + "c" * 64, size))
            block = b"z" * (1 << 20)
            try:
                for _ in range(size >> 20):
                    writer.write(block)
                    await writer.drain()
            except ConnectionError:
                pass  # the gateway closed after its answer

        sender = asyncio.create_task(send())
        status, body = await read_response(reader)
        assert (status, json.loads(body)) == (504, {"error": "upstream timed out"})
        upstream.resume.set()
        writer.transport.abort()
        await asyncio.wait_for(sender, 5)
        await asyncio.wait_for(upstream.ended.wait(), 5)
    finally:
        await upstream.close()
    assert upstream.ending == "reset"


async def test_bodies_on_bodyless_methods_never_hold_upstream_connections(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """Anonymous clients announcing a body on `/api/version` and sending one byte of it.

    With 4 upstream connections, 20 of them got an upstream connection each and stalled every
    authenticated request until their bodies timed out; now they are refused at once.
    """
    gw = await gateway_factory({"upstream": {"url": fake.url, "max_connections": 4}, "auth": AUTH})
    host, port = gw.host_port.rsplit(":", 1)
    clients = [await asyncio.open_connection(host, int(port)) for _ in range(20)]
    try:
        for _reader, writer in clients:
            writer.write(raw_head("GET", "/api/version", 1000, auth=False) + b"x")
        for i, (reader, _writer) in enumerate(clients):
            status, body = await read_response(reader)
            assert status == 400, i
            assert json.loads(body) == {"error": "a GET request carries no body"}
        started = time.monotonic()
        async with (
            aiohttp.ClientSession(headers=ADMIN_HEADERS) as http,
            http.get(gw.url + "/api/tags") as response,
        ):
            assert response.status == 200
        assert time.monotonic() - started < 1.0
    finally:
        for _reader, writer in clients:
            writer.close()
    assert fake.requests_to("/api/version") == []


async def test_a_bodyless_request_with_an_empty_body_still_passes(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """`Content-Length: 0` on a GET is no body: clients that send it keep working."""
    gw = await gateway_factory({"upstream": {"url": fake.url}, "auth": AUTH})
    host, port = gw.host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw_head("GET", "/api/version", 0, auth=False))
        status, body = await read_response(reader)
    finally:
        writer.close()
    assert status == 200 and b"version" in body
