"""A lean HTTP/1.1 client for the relay's hot path: Ollama on keep-alive connections.

aiohttp's ClientSession is general (cookies, redirects, tracing, proxies, auto headers);
the relay needs none of it and paid for all of it on every request. This client writes the
request head itself, parses the response framing (Content-Length, chunked, until close) as
bytes arrive, and hands body pieces to one reader with flow control: when the reader lags,
the upstream socket stops being read, so memory stays flat however fast Ollama writes.

A request reaches Ollama at most once: a pooled connection is checked before reuse (an idle
keep-alive socket that is readable was closed or reset by Ollama) and never retried once the
request was written, whatever the method: Ollama may have started a generation, a pull or a
delete. A request body that breaks or stalls halfway resets the connection (RST), so Ollama
never takes half a body for a whole one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import select
import socket
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.watchdog import Watchdog

MAX_HEAD = 64 * 1024  # Ollama's response heads are a few hundred bytes
HIGH_WATER = 256 * 1024  # unread body bytes before the upstream socket is paused
IDLE_PER_HOST = 256
IDLE_SECONDS = 30.0  # drop idle connections before a server-side idle timeout races a request
NO_BODY_STATUSES = frozenset({204, 304})
HEX_DIGITS = b"0123456789abcdefABCDEF"


class UnsafeHeader(ValueError):
    """A header that would split the request head (CR/LF): never written upstream."""


class UpstreamError(Exception):
    """The upstream connection failed; `refused` when it never opened."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class UpstreamTimeout(UpstreamError):
    """Ollama stopped taking the request body for `send_timeout` seconds."""


class ClientBodyTimeout(Exception):
    """The client sent no byte of its request body for `body_timeout` seconds."""


class SendTimer(Protocol):
    """The caller's first-byte timer: it runs only once the request is fully sent."""

    def arm(self) -> None: ...
    def pause(self) -> None: ...


# SO_LINGER on, 0 s: close() sends RST instead of FIN, so the peer sees a reset connection
# rather than an orderly end of a request body.
_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Origin:
    host: str
    port: int
    tls: bool

    @classmethod
    def of(cls, url: URL) -> Origin:
        return cls(
            url.host or "127.0.0.1",
            url.port or (443 if url.scheme == "https" else 80),
            url.scheme == "https",
        )

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self._state = _DONE
        self._buf = bytearray()
        self._remaining = 0
        self._head: asyncio.Future[tuple[int, str, CIMultiDictProxy[str]]] | None = None
        self._pieces: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._paused = False
        self._write_ready: asyncio.Future[None] | None = None
        self._head_request = False
        self._keep_alive = True
        self.answered = False  # some byte of this exchange's answer arrived
        self.idle_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        if self._state == _UNTIL_CLOSE:
            self._state = _DONE
            self._wake()
            return
        if self._state != _DONE or (self._head is not None and not self._head.done()):
            self._fail(UpstreamError("upstream closed the connection"))
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)  # the sender sees the closed transport

    def pause_writing(self) -> None:
        if self._write_ready is None or self._write_ready.done():
            self._write_ready = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self._feed(data)
        except UpstreamError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost finishes the exchange

    # -- exchange ------------------------------------------------------------------------

    def start(self, head_request: bool) -> asyncio.Future[tuple[int, str, CIMultiDictProxy[str]]]:
        self._state = _HEAD
        self._buf.clear()
        self._pieces.clear()
        self._queued = 0
        self._error = None
        self._head_request = head_request
        self._keep_alive = True
        self.reusable = False
        self.answered = False
        self._head = asyncio.get_running_loop().create_future()
        return self._head

    async def drain(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            await self._write_ready

    async def read_chunk(self) -> bytes:
        """The body bytes available now (waiting for some); b"" once the body has ended."""
        while not self._pieces:
            if self._error is not None:
                raise self._error
            if self._state == _DONE:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._pieces.popleft() if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces.clear()
        self._queued = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def finished(self) -> bool:
        return self._state == _DONE and self._error is None

    @property
    def head_received(self) -> bool:
        return self._head is not None and self._head.done()

    @property
    def write_blocked(self) -> bool:
        return self._write_ready is not None and not self._write_ready.done()

    def abort(self) -> None:
        """Reset the connection: a request cut short must never look complete to Ollama.

        A FIN after a partial chunked body, or a short Content-Length body, is at the
        mercy of the server's parser; an RST is unambiguous.
        """
        transport = self.transport
        self.reusable = False
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def fail(self, exc: BaseException) -> None:
        """End the exchange with `exc` (the first failure wins over what follows from it)."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.reusable = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(self._error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _deliver(self, piece: bytes) -> None:
        if not piece:
            return
        self._pieces.append(piece)
        self._queued += len(piece)
        if self._queued > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True  # the reader lags: stop reading Ollama until it catches up
            self.transport.pause_reading()
        self._wake()

    def _end_body(self) -> None:
        self._state = _DONE
        self.reusable = self._keep_alive and not self._buf
        self._wake()

    def _feed(self, data: bytes) -> None:
        state = self._state
        if state == _LENGTH and not self._buf and len(data) <= self._remaining:
            self._remaining -= len(data)  # the common case: no copy at all
            self._deliver(data)
            if self._remaining == 0:
                self._end_body()
            return
        if state == _CHUNK_SIZE and not self._buf:
            data = self._whole_frames(data)  # Ollama flushes one record per chunk frame
            if not data:
                return
        if state == _UNTIL_CLOSE:
            self._deliver(data)
            return
        if state == _DONE:
            if data:
                self.reusable = False  # bytes nobody asked for: never reuse this connection
            return
        self._buf += data
        self._parse()

    def _whole_frames(self, data: bytes) -> bytes:
        """Deliver the complete `size CRLF payload CRLF` frames at the start of `data`.

        Returns what is left (a partial frame, or the last chunk) for the general parser.
        """
        at = 0
        end = len(data)
        while at < end:
            line_end = data.find(b"\r\n", at, at + 20)
            if line_end < 0:
                break
            digits = data[at:line_end]
            if not digits or digits.translate(None, HEX_DIGITS):
                break  # extensions, or not a size at all: the general parser decides
            size = int(digits, 16)
            start = line_end + 2
            stop = start + size
            if size == 0 or stop + 2 > end or data[stop : stop + 2] != b"\r\n":
                break
            self._deliver(data[start:stop])
            at = stop + 2
        return data[at:] if at else data

    def _parse(self) -> None:
        buf = self._buf
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise UpstreamError("upstream response head too large")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._on_head(head):
                    continue
                return
            if state == _LENGTH:
                take = min(self._remaining, len(buf))
                piece = bytes(buf[:take])
                del buf[:take]
                self._remaining -= take
                self._deliver(piece)
                if self._remaining == 0:
                    self._end_body()
                return
            if state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise UpstreamError("bad chunk size line from upstream")
                    return
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                # Hex digits only: int() alone would take "-1", "0x1f" or "1_0".
                if not line or len(line) > 16 or line.translate(None, HEX_DIGITS):
                    raise UpstreamError("bad chunk size from upstream")
                size = int(line, 16)
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining, self._state = size, _CHUNK_DATA
                continue
            if state == _CHUNK_DATA:
                if not buf:
                    return
                take = min(self._remaining, len(buf))
                self._deliver(bytes(buf[:take]))
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _CHUNK_CRLF
                continue
            if state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise UpstreamError("bad chunk framing from upstream")
                del buf[:2]
                self._state = _CHUNK_SIZE
                continue
            if state == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:  # the empty line after the last chunk (and any trailers)
                    self._end_body()
                    return
                continue
            if state == _UNTIL_CLOSE:  # body bytes that came with the head
                self._deliver(bytes(buf))
                buf.clear()
            return

    def _on_head(self, head: bytes) -> bool:
        """Parse the status line and headers; True when body bytes may follow."""
        lines = head.split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise UpstreamError("malformed upstream status line")
        try:
            status = int(parts[1])
        except ValueError:
            raise UpstreamError("malformed upstream status") from None
        if 100 <= status < 200:
            return True  # an interim response (100 Continue): the real head follows
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                raise UpstreamError("malformed upstream header")
            headers.add(name, value.strip())
        connection = headers.get("Connection", "").lower()
        self._keep_alive = parts[0] == "HTTP/1.1" and "close" not in connection
        reason = parts[2] if len(parts) > 2 else ""
        assert self._head is not None
        if not self._head.done():
            self._head.set_result((status, reason, CIMultiDictProxy(headers)))
        if self._head_request or status in NO_BODY_STATUSES:
            self._end_body()
            return False
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            self._state = _CHUNK_SIZE
        elif "Content-Length" in headers:
            try:
                self._remaining = int(headers["Content-Length"])
            except ValueError:
                raise UpstreamError("bad upstream Content-Length") from None
            if self._remaining == 0:
                self._end_body()
                return False
            self._state = _LENGTH
        else:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False
        return True


class UpstreamResponse:
    """Status and headers of an answer; its body is read piece by piece."""

    __slots__ = ("status", "reason", "headers", "_conn", "_pool", "_origin", "_sender", "_open")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        conn: UpstreamConnection,
        pool: UpstreamPool,
        origin: Origin,
        sender: asyncio.Task[None] | None,
    ) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self._conn, self._pool, self._origin, self._sender = conn, pool, origin, sender
        self._open = True  # holds one of the pool's connection slots until released

    async def read_chunk(self) -> bytes:
        return await self._conn.read_chunk()

    def release(self) -> None:
        """Back to the pool if the exchange finished cleanly; else the connection is closed."""
        sender_done = self._sender is None or self._sender.done()
        if self._conn.finished and self._conn.reusable and sender_done:
            self._pool.put(self._origin, self._conn)
            self._free_slot()
        else:
            self.close()

    def close(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            self._conn.abort()  # the request body was cut short: a reset, never a clean end
        else:
            self._conn.reusable = False
            if self._conn.transport is not None:
                self._conn.transport.close()  # Ollama sees the disconnect, stops generating
        self._free_slot()

    def _free_slot(self) -> None:
        if self._open:
            self._open = False
            self._pool.slot_done()


class UpstreamPool:
    """Idle keep-alive connections per origin, bounded."""

    def __init__(self, tls_context: ssl.SSLContext | None = None, max_connections: int = 0) -> None:
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._tls = tls_context
        # `upstream.max_connections`: exchanges at once; more wait for a free connection.
        self._slots = asyncio.Semaphore(max_connections) if max_connections > 0 else None

    def slot_done(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def put(self, origin: Origin, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(origin, [])
        conn.idle_since = asyncio.get_running_loop().time()
        if len(idle) < IDLE_PER_HOST:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                if conn.transport is not None:
                    conn.transport.close()
        self._idle.clear()

    async def _connect(self, origin: Origin, within: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.tls:
            tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(within):
                _, conn = await loop.create_connection(
                    UpstreamConnection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise
        except OSError as exc:
            raise UpstreamError(
                f"upstream unreachable: {exc.strerror or exc}", refused=True
            ) from None
        return conn

    def _take_idle(self, origin: Origin) -> UpstreamConnection | None:
        """An idle connection still fit to carry a request, or None.

        Ollama closes idle keep-alive connections; a request written onto one would be lost,
        and may not be sent again (it might have arrived). So each candidate is checked
        before any byte is written: one the upstream closed is dropped, not used.
        """
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > IDLE_SECONDS or _readable(conn.transport):
                conn.transport.close()
                continue
            return conn
        return None

    async def request(
        self,
        method: str,
        url: URL,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | StreamReader | None,
        content_length: int | None,
        connect_timeout: float,
        *,
        timer: SendTimer | None = None,
        body_timeout: float | None = None,
        send_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the response head arrived.

        `timer` is paused while a streamed body is sent and armed once the request is
        fully written. `body_timeout`: seconds without a byte of the client's streamed body
        (then ClientBodyTimeout); `send_timeout`: seconds Ollama may stop taking it (then
        UpstreamTimeout). Either way the upstream connection is reset.
        """
        origin = Origin.of(url)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {origin.authority}"]
        for name, value in headers:
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise UnsafeHeader(name)  # request smuggling into Ollama: refused
            lines.append(f"{name}: {value}")
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}")
        elif body is not None:
            lines.append(
                f"Content-Length: {content_length}"
                if content_length is not None
                else "Transfer-Encoding: chunked"
            )
        # aiohttp's parser decoded the client's header bytes as UTF-8 with surrogateescape:
        # encoding the same way gives Ollama exactly the bytes the client sent.
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        if self._slots is not None:
            await self._slots.acquire()
        try:
            # No retry, whatever the method: once written, a request may have reached Ollama.
            conn = self._take_idle(origin) or await self._connect(origin, connect_timeout)
            sending = _Sending(timer, body_timeout, send_timeout)
            return await self._exchange(conn, origin, method, head, body, content_length, sending)
        except BaseException:
            self.slot_done()  # no response holds the slot
            raise

    async def _exchange(
        self,
        conn: UpstreamConnection,
        origin: Origin,
        method: str,
        head: bytes,
        body: bytes | StreamReader | None,
        content_length: int | None,
        sending: _Sending,
    ) -> UpstreamResponse:
        transport = conn.transport
        assert transport is not None
        answer = conn.start(head_request=method == "HEAD")
        sender: asyncio.Task[None] | None = None
        if isinstance(body, bytes):
            transport.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                transport.write(body)
            sending.written(conn)
        elif body is None:
            transport.write(head)
            sending.written(conn)
        else:
            if sending.timer is not None:
                sending.timer.pause()  # uploading is the client's time, not Ollama's
            transport.write(head)
            sender = asyncio.create_task(
                _send_body(conn, body, chunked=content_length is None, sending=sending)
            )
        try:
            status, reason, headers = await answer
        except BaseException:
            if sender is not None and not sender.done():
                sender.cancel()
                conn.abort()
            else:
                transport.close()
            raise
        return UpstreamResponse(status, reason, headers, conn, self, origin, sender)


def _readable(transport: asyncio.BaseTransport) -> bool:
    """True when an idle connection's socket has something to read: EOF, RST or stray bytes.

    The event loop may not have run since the peer's FIN arrived, so `is_closing()` alone
    misses a connection closed a moment ago; the kernel already knows.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(select, "poll"):  # no poll (Windows): is_closing() only
        return False
    try:
        fd = sock.fileno()
    except (OSError, ValueError):
        return True
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


@dataclass(frozen=True, slots=True)
class _Sending:
    """How one request body is timed on its way up."""

    timer: SendTimer | None
    body_timeout: float | None
    send_timeout: float | None

    def written(self, conn: UpstreamConnection) -> None:
        """The whole request is handed over: Ollama's time starts once the socket takes it."""
        timer = self.timer
        if timer is None:
            return
        ready = conn._write_ready
        if ready is None or ready.done():
            timer.arm()
        else:  # still queued in our buffer (a big JSON body, a slow upstream)
            ready.add_done_callback(lambda _: None if conn.head_received else timer.arm())

    async def drain(self, conn: UpstreamConnection) -> None:
        if not conn.write_blocked:
            return
        try:
            async with asyncio.timeout(self.send_timeout):
                await conn.drain()
        except TimeoutError:
            raise UpstreamTimeout("upstream stopped reading the request body") from None


async def _send_body(
    conn: UpstreamConnection, body: StreamReader, *, chunked: bool, sending: _Sending
) -> None:
    """Stream a request body (a blob upload) with backpressure; stop if Ollama answered.

    Every way out short of the whole body resets the upstream connection: Ollama must never
    act on half a blob or half a JSON document.
    """
    transport = conn.transport
    assert transport is not None
    idle = Watchdog(sending.body_timeout) if sending.body_timeout else None
    try:
        while True:
            if idle is not None:
                idle.arm()
            piece = await body.readany()
            if idle is not None:
                idle.pause()
            if not piece:
                break
            if transport.is_closing():
                return  # Ollama answered early (the blob exists) and hung up
            if chunked:
                transport.writelines((f"{len(piece):x}\r\n".encode(), piece, b"\r\n"))
            else:
                transport.write(piece)
            await sending.drain(conn)
        if transport.is_closing():
            return
        if chunked:
            transport.write(b"0\r\n\r\n")
        if sending.timer is not None and not conn.head_received:
            sending.written(conn)
    except asyncio.CancelledError:
        if idle is None or not idle.fired():
            raise  # the exchange is over (client gone, answer read): the canceller resets
        conn.fail(ClientBodyTimeout("request body timed out"))
        conn.abort()
    except UpstreamTimeout as exc:
        conn.fail(exc)
        conn.abort()
    except Exception:  # the client's upload broke: Ollama must not get half a blob
        conn.abort()  # the answer side reports the failure as a reset
    finally:
        if idle is not None:
            idle.stop()
