"""A real redis-server for the limiter tests: free port, no persistence, ready when it says so.

Readiness is awaited by reading the server's own "Ready to accept connections" line and then
answering a PING over a real connection: never by sleeping.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import free_port, require_binary

READY_LINE = b"Ready to accept connections"
START_TIMEOUT = 10.0


class RedisServer:
    """One redis-server process; `stop()` and `start()` again keep the same port."""

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Blocking (run it off the event loop with asyncio.to_thread inside a test)."""
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "notice",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        log = b""
        for line in self.process.stdout:  # ends when the process exits
            log += line
            if READY_LINE in line:
                break
        else:
            raise RuntimeError(f"redis-server did not start:\n{log.decode(errors='replace')}")
        self.process.stdout.close()  # nothing more to read: never let its pipe fill up
        self.ping()
        return self

    def ping(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=START_TIMEOUT) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(64).startswith(b"+PONG")

    def command(self, *words: str) -> bytes:
        """One inline command (FLUSHALL...), for fixtures."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=START_TIMEOUT) as sock:
            sock.sendall(" ".join(words).encode() + b"\r\n")
            return sock.recv(4096)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=START_TIMEOUT)
        self.process = None


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    """One server for the whole run (each test starts from FLUSHALL)."""
    server = RedisServer(require_binary("redis-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    assert redis_session.command("FLUSHALL").startswith(b"+OK")
    return redis_session


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop and restart it."""
    server = RedisServer(require_binary("redis-server")).start()
    try:
        yield server
    finally:
        server.stop()
