"""The relay's lean HTTP/1.1 client: framing, keep-alive, flow control, failures, TLS.

Framing is checked by feeding a real connection object the exact bytes Ollama sends, split
at every possible boundary; the network behaviour against small real servers on loopback.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from yarl import URL

from gateway.upstream_client import HIGH_WATER, UpstreamConnection, UpstreamError, UpstreamPool
from tests.conftest import GatewayFactory, until
from tests.fake_ollama import FakeOllama
from tests.ops_support import make_certificate

NDJSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
    b"Date: Wed, 25 Nov 2026 00:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n"
)
RECORDS = [b'{"response":"a","done":false}\n', b'{"response":"","done":true}\n']
CHUNKED_BODY = b"".join(f"{len(r):x}\r\n".encode() + r + b"\r\n" for r in RECORDS) + b"0\r\n\r\n"


class FakeTransport(asyncio.Transport):
    """Records writes and reading pauses; a stand-in for the socket in framing tests."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def exchange(
    wire: bytes, split: int | None, *, head_request: bool = False
) -> tuple[int, bytes, UpstreamConnection]:
    conn = UpstreamConnection()
    conn.connection_made(FakeTransport())
    answer = conn.start(head_request=head_request)
    pieces = [wire] if split is None else [wire[:split], wire[split:]]
    for piece in pieces:
        conn.data_received(piece)
    status, _reason, _headers = await answer
    body = b""
    while chunk := await conn.read_chunk():
        body += chunk
    return status, body, conn


@pytest.mark.parametrize("split", range(len(NDJSON_HEAD + CHUNKED_BODY)))
async def test_chunked_body_split_anywhere(split: int) -> None:
    status, body, conn = await exchange(NDJSON_HEAD + CHUNKED_BODY, split)
    assert status == 200
    assert body == b"".join(RECORDS)
    assert conn.finished and conn.reusable


async def test_content_length_body_and_keep_alive() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
    for split in range(len(wire)):
        status, body, conn = await exchange(wire, split)
        assert (status, body, conn.reusable) == (200, b"hello world", True)


@pytest.mark.parametrize(
    ("wire", "head_request", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", True, b""),  # HEAD: no body
        (b"HTTP/1.1 204 No Content\r\n\r\n", False, b""),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", False, b""),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            False,
            b"",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\n"
            b"X-Trailer: 1\r\n\r\n",
            False,
            b"hello",
        ),
    ],
)
async def test_bodies_without_data_or_with_extensions(
    wire: bytes, head_request: bool, body: bytes
) -> None:
    status, received, conn = await exchange(wire, None, head_request=head_request)
    assert received == body
    assert conn.finished


async def test_body_until_close_is_never_reused() -> None:
    conn = UpstreamConnection()
    conn.connection_made(FakeTransport())
    answer = conn.start(head_request=False)
    conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert (await answer)[0] == 200
    assert await conn.read_chunk() == b"all of it"
    conn.connection_lost(None)
    assert await conn.read_chunk() == b""
    assert not conn.reusable


@pytest.mark.parametrize(
    "wire",
    [
        b"SMTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nab\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nab\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n" + b"a" * 16 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
    ],
)
async def test_malformed_answers_are_upstream_errors(wire: bytes) -> None:
    conn = UpstreamConnection()
    transport = FakeTransport()
    conn.connection_made(transport)
    answer = conn.start(head_request=False)
    conn.data_received(wire)
    with pytest.raises(UpstreamError):
        await answer
        while await conn.read_chunk():  # what came before the fault, then the fault
            pass
    assert transport.closed and not conn.reusable


async def test_a_connection_dying_mid_body_is_an_error_not_an_end() -> None:
    conn = UpstreamConnection()
    conn.connection_made(FakeTransport())
    answer = conn.start(head_request=False)
    conn.data_received(NDJSON_HEAD + CHUNKED_BODY[:20])
    await answer
    assert await conn.read_chunk()
    conn.connection_lost(ConnectionResetError())
    with pytest.raises(UpstreamError):
        await conn.read_chunk()


async def test_a_lagging_reader_pauses_the_upstream_socket() -> None:
    conn = UpstreamConnection()
    transport = FakeTransport()
    conn.connection_made(transport)
    answer = conn.start(head_request=False)
    size = 8 * HIGH_WATER
    conn.data_received(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
    await answer
    for _ in range(size // 65536):
        if transport.paused:
            break
        conn.data_received(b"x" * 65536)
    assert transport.paused  # memory stays flat: Ollama waits for the client
    assert len(await conn.read_chunk()) <= HIGH_WATER + 65536
    assert not transport.paused


# --- against real servers on loopback ---------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_server(handler: Handler) -> tuple[asyncio.Server, URL]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, URL(f"http://127.0.0.1:{port}")


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool()
    yield p
    p.close()


async def body_of(pool: UpstreamPool, url: URL, target: str = "/api/version") -> tuple[int, bytes]:
    response = await pool.request("GET", url, target, [], None, None, 5)
    body = b""
    while chunk := await response.read_chunk():
        body += chunk
    response.release()
    return response.status, body


class KeepAliveServer:
    """Answers `ok` to every request on a connection until the client closes it."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.closed += 1


async def test_keep_alive_reuses_one_connection(pool: UpstreamPool) -> None:
    upstream = KeepAliveServer()
    server, url = await raw_server(upstream.serve)
    async with server:
        for _ in range(5):
            assert await body_of(pool, url) == (200, b"ok")
        pool.close()  # the server's handler sees the end of the connection and finishes
        await until(lambda: upstream.closed == 1)
    assert upstream.connections == 1


async def test_a_pooled_connection_closed_by_the_upstream_is_not_reused(
    pool: UpstreamPool,
) -> None:
    """Ollama closes idle keep-alive connections; the next request must not fail for it."""
    requests_seen = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests_seen
        await read_request(reader)
        requests_seen += 1
        # Announces keep-alive, then hangs up once the answer is out.
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server, url = await raw_server(serve)
    async with server:
        assert await body_of(pool, url) == (200, b"ok")
        assert await body_of(pool, url) == (200, b"ok")
    assert requests_seen == 2


async def test_unreachable_upstream_is_refused(pool: UpstreamPool) -> None:
    server, url = await raw_server(read_request)  # type: ignore[arg-type]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError) as info:
        await pool.request("GET", url, "/", [], None, None, 5)
    assert info.value.refused


async def test_path_prefix_of_the_upstream_url_is_kept(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """Ollama behind a sub-path (`http://host/ollama`) gets `/ollama/api/...`."""
    import aiohttp

    gw = await gateway_factory({"upstream": {"url": fake.url + "/ollama"}})
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/api/tags?x=1") as response:
        assert response.status == 404  # the fake has no /ollama prefix: Ollama's own 404
    seen = fake.requests[-1]
    assert (seen.path, seen.query) == ("/ollama/api/tags", "x=1")


async def test_https_upstream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: UpstreamPool
) -> None:
    cert = make_certificate(tmp_path, "upstream")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.33.0", "host": request.host})

    app = web.Application()
    app.router.add_get("/api/version", version)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = URL(f"https://localhost:{port}")
        with pytest.raises(UpstreamError):  # not trusted yet: verification is on
            await body_of(pool, url)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert.cert))
        status, body = await body_of(UpstreamPool(), url)
        assert status == 200 and b'"0.33.0"' in body
    finally:
        await runner.cleanup()


async def test_no_retry_once_part_of_an_answer_came(pool: UpstreamPool) -> None:
    """A request the upstream began answering is never sent twice (it may have acted)."""
    requests_seen = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests_seen
        await read_request(reader)
        requests_seen += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)
        requests_seen += 1
        writer.write(b"HTTP/1.1 20")  # dies halfway through the status line
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server, url = await raw_server(serve)
    async with server:
        assert await body_of(pool, url) == (200, b"ok")
        with pytest.raises(UpstreamError):
            await body_of(pool, url)
    assert requests_seen == 2


async def test_max_connections_bounds_exchanges_at_once() -> None:
    """`upstream.max_connections`: a second request waits until the first is released."""
    limited = UpstreamPool(max_connections=1)
    upstream = KeepAliveServer()
    server, url = await raw_server(upstream.serve)
    async with server:
        first = await limited.request("GET", url, "/", [], None, None, 5)
        second = asyncio.create_task(body_of(limited, url))
        await asyncio.sleep(0)  # let it start: it must wait for the slot, not fail
        assert not second.done()
        assert limited._slots is not None and limited._slots.locked()
        while await first.read_chunk():
            pass
        first.release()
        assert await asyncio.wait_for(second, 5) == (200, b"ok")
        limited.close()
        await until(lambda: upstream.closed == 1)  # the server side has closed its end too


async def test_a_header_that_would_split_the_request_is_refused(pool: UpstreamPool) -> None:
    """Defence in depth: aiohttp's parser already refuses these; the writer never trusts it."""
    from gateway.upstream_client import UnsafeHeader

    for name, value in (("X-A", "ok\r\nX-Injected: 1"), ("X-B", "ok\nGET / HTTP/1.1")):
        with pytest.raises(UnsafeHeader):
            await pool.request(
                "GET", URL("http://127.0.0.1:9"), "/", [(name, value)], None, None, 5
            )
