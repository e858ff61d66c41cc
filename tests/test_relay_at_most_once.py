"""A request reaches Ollama at most once (issue 10, item 3).

An upstream on a real socket that reads a request and then drops the connection must see it
once, whatever the method, and the client gets 502; a pooled connection Ollama closed while
idle is noticed before use, so no request is lost on it either.
"""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from yarl import URL

from gateway.upstream_client import UpstreamPool
from tests.conftest import ADMIN_HEADERS, ADMIN_KEY_ENTRY, GatewayFactory, until

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class DroppingUpstream:
    """Answers the first request on each connection; reads the next one whole, then hangs up.

    `requests` records each request line it read completely, in order.
    """

    def __init__(self, *, answer_first: bool = True) -> None:
        self.answer_first = answer_first
        self.requests: list[str] = []
        self.connections = 0
        self.finished = 0  # connections whose handler has closed its end
        self.server: asyncio.Server | None = None

    async def start(self) -> URL:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")

    async def close(self) -> None:
        assert self.server is not None
        await until(lambda: self.finished == self.connections)
        self.server.close()
        await self.server.wait_closed()

    async def read_one(self, reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        self.requests.append(head.split(b"\r\n", 1)[0].decode())

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.answer_first:
                await self.read_one(reader)
                writer.write(OK)
                await writer.drain()
            await self.read_one(reader)  # received in full, then never answered
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            await writer.wait_closed()
            self.finished += 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/generate", b'{"model":"llama3","prompt":"hi"}'),
        ("POST", "/api/pull", b'{"model":"llama3"}'),
        ("GET", "/api/tags", None),
    ],
)
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "fresh"])
async def test_a_request_the_upstream_dropped_is_sent_once_and_answered_502(
    gateway_factory: GatewayFactory, method: str, path: str, body: bytes | None, pooled: bool
) -> None:
    upstream = DroppingUpstream(answer_first=pooled)
    url = await upstream.start()
    try:
        gw = await gateway_factory(
            {"upstream": {"url": str(url)}, "auth": {"api_keys": [ADMIN_KEY_ENTRY]}}
        )
        async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as http:
            if pooled:  # leaves a keep-alive connection in the gateway's pool
                async with http.get(gw.url + "/api/version") as first:
                    assert first.status == 200
            async with http.request(method, gw.url + path, data=body) as response:
                assert response.status == 502
                assert (await response.json())["error"] == "upstream closed the connection"
    finally:
        await upstream.close()
    expected = ["GET /api/version HTTP/1.1"] if pooled else []
    assert upstream.requests == [*expected, f"{method} {path} HTTP/1.1"]  # never twice


async def test_a_pooled_connection_closed_while_idle_is_not_used() -> None:
    """Ollama's idle close raced with our next request: noticed before a byte is written.

    The server side shuts its socket down synchronously and the request starts before the
    event loop runs again, so only the check of the socket itself can tell.
    """
    sockets: list[socket.socket] = []
    requests: list[int] = []
    finished: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(sockets)
        sockets.append(writer.get_extra_info("socket"))
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            requests.append(index)
            writer.write(OK)
            await writer.drain()
        writer.close()
        finished.append(index)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    pool = UpstreamPool()

    async def get() -> int:
        response = await pool.request("POST", url, "/api/generate", [], b"{}", None, 5)
        while await response.read_chunk():
            pass
        response.release()
        return response.status

    try:
        async with server:
            assert await get() == 200
            sockets[0].shutdown(socket.SHUT_RDWR)  # Ollama's idle close, FIN on the wire now
            assert await get() == 200  # on a new connection, not a failed request
            pool.close()
            await until(lambda: len(finished) == 2)  # both handlers closed their ends
    finally:
        pool.close()
    assert requests == [0, 1]  # one request per connection: the first one was never reused
