"""A deliberately minimal, fast fake Ollama for load tests (not for correctness tests).

Raw asyncio Protocol on uvloop, HTTP/1.1 keep-alive, no framework: at the request rates the
bench drives, an aiohttp-based fake would be the bottleneck and hide the proxy's cost.

Routes:
- `GET /api/tags`, `GET /api/ps`, `GET /api/version`: fixed JSON with Content-Length, in
  Ollama's shapes (three installed models, `llama3.2:latest` loaded), so that a gateway with
  several upstreams learns its catalogue from it.
- `POST /api/chat`: NDJSON in Ollama's record shape, chunked transfer encoding, one HTTP chunk
  per record, each record carrying `"sent_ns"`: CLOCK_MONOTONIC (system-wide, so comparable
  across processes) read just before the write. Per request overrides via headers:
  `X-Bench-Chunks: N`, `X-Bench-Delay-Ms: F` (between records), `X-Bench-Hold: SECONDS`
  (send the first record, then nothing for SECONDS or until the client leaves).
  `options.num_predict` in the body, when below the chunk count, cuts the stream there.
  `"stream": false` in the body: one JSON answer (Content-Length) in Ollama's non-streamed
  shape, sent when the last record would have been (after (N - 1) x delay).
- `GET /bench/slots`: with `--parallel`, the slot state per model as JSON
  (`running`, `waiting`, `max_running`, `max_waiting`, `grants`); the two maxima restart
  from the current values after each read (so a bench can read them per phase).

With `--parallel P`, each model (`llama3.2` and `llama3.2:latest` alike) runs at most P
`/api/chat` streams at once and queues the rest first-in first-out with no depth limit, like
Ollama's per-model semaphore (OLLAMA_NUM_PARALLEL): a queued request gets no byte (not even
its status line) until its slot is granted, a client that leaves while queued leaves the
queue, and the slot is held until the last record is written or the client goes.

    python bench/fast_upstream.py --port 0 [--chunks 50] [--chunk-delay 0.02] [--parallel P]
        [--loop asyncio]

Prints `fast-upstream listening on http://127.0.0.1:PORT` once accepting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

MAX_HEAD = 64 * 1024  # a request head beyond this is garbage: close
MAX_HOLD = 600.0  # bound on how long a held stream stays open

TAGS_BODY = json.dumps(
    {
        "models": [
            {
                "name": name,
                "model": name,
                "modified_at": "2025-10-26T17:15:24.097767+02:00",
                "size": size,
                "digest": digest * 64,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": family,
                    "families": [family],
                    "parameter_size": params,
                    "quantization_level": "Q4_K_M",
                },
            }
            for name, size, digest, family, params in (
                ("llama3.2:latest", 2019393189, "a", "llama", "3.2B"),
                ("qwen2.5:7b", 4683087332, "b", "qwen2", "7.6B"),
                ("all-minilm:latest", 45960996, "c", "bert", "23M"),
            )
        ]
    },
    separators=(",", ":"),
).encode()
PS_BODY = json.dumps(
    {
        "models": [
            {
                "name": "llama3.2:latest",
                "model": "llama3.2:latest",
                "size": 3825819519,
                "digest": "a" * 64,
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "llama",
                    "families": ["llama"],
                    "parameter_size": "3.2B",
                    "quantization_level": "Q4_K_M",
                },
                "expires_at": "2099-01-01T00:00:00.000000000Z",
                "size_vram": 3825819519,
                "context_length": 4096,
            }
        ]
    },
    separators=(",", ":"),
).encode()
VERSION_BODY = b'{"version":"0.12.6"}'
NOT_FOUND_BODY = b"404 page not found"


class _Clock:
    """`Date` header and `created_at`, recomputed at most once a second (not per chunk)."""

    __slots__ = ("_second", "date", "created_at")

    def __init__(self) -> None:
        self._second = -1
        self.date = b""
        self.created_at = b""

    def tick(self) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self.date = formatdate(now, usegmt=True).encode()
            self.created_at = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now)).encode()


CLOCK = _Clock()


def _fixed(status: bytes, ctype: bytes, body: bytes, *, close: bool = False) -> bytes:
    CLOCK.tick()
    return b"".join(
        (
            b"HTTP/1.1 ",
            status,
            b"\r\nContent-Type: ",
            ctype,
            b"\r\nDate: ",
            CLOCK.date,
            b"\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\nConnection: close" if close else b"",
            b"\r\n\r\n",
            body,
        )
    )


def chat_record(model: bytes, content: bytes, sent_ns: int) -> bytes:
    return b"".join(
        (
            b'{"model":"',
            model,
            b'","created_at":"',
            CLOCK.created_at,
            b'","message":{"role":"assistant","content":"',
            content,
            b'"},"done":false,"sent_ns":',
            str(sent_ns).encode(),
            b"}\n",
        )
    )


def final_record(model: bytes, count: int, sent_ns: int) -> bytes:
    return b"".join(
        (
            b'{"model":"',
            model,
            b'","created_at":"',
            CLOCK.created_at,
            b'","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
            b'"total_duration":4883583458,"load_duration":1334875,"prompt_eval_count":26,'
            b'"prompt_eval_duration":342546000,"eval_count":',
            str(count).encode(),
            b',"eval_duration":4535599000,"sent_ns":',
            str(sent_ns).encode(),
            b"}\n",
        )
    )


def whole_answer(model: bytes, chunks: int, sent_ns: int) -> bytes:
    """The non-streamed answer (`"stream": false`): one JSON object, the content in full."""
    content = b"tok" * (chunks - 1)
    return b"".join(
        (
            b'{"model":"',
            model,
            b'","created_at":"',
            CLOCK.created_at,
            b'","message":{"role":"assistant","content":"',
            content,
            b'"},"done_reason":"stop","done":true,"total_duration":4883583458,'
            b'"load_duration":1334875,"prompt_eval_count":26,"prompt_eval_duration":342546000,'
            b'"eval_count":',
            str(chunks).encode(),
            b',"eval_duration":4535599000,"sent_ns":',
            str(sent_ns).encode(),
            b"}",
        )
    )


def http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Settings:
    __slots__ = ("chunks", "delay", "slots")

    def __init__(self, chunks: int, delay: float, parallel: int = 0) -> None:
        self.chunks = chunks
        self.delay = delay
        self.slots = Slots(parallel) if parallel > 0 else None


class Slots:
    """Ollama's per-model semaphore: `parallel` streams at once, the rest FIFO, no depth limit."""

    __slots__ = ("parallel", "running", "queues", "max_running", "max_waiting", "grants")

    def __init__(self, parallel: int) -> None:
        self.parallel = parallel
        self.running: dict[bytes, int] = {}
        self.queues: dict[bytes, deque[UpstreamProtocol]] = {}
        self.max_running: dict[bytes, int] = {}
        self.max_waiting: dict[bytes, int] = {}
        self.grants: dict[bytes, int] = {}

    def acquire(self, proto: UpstreamProtocol, key: bytes) -> bool:
        """True: the slot is granted now; False: `proto` is queued (`begin` is called later)."""
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = deque()
        if not queue and self.running.get(key, 0) < self.parallel:
            self._grant(key)
            return True
        queue.append(proto)
        if len(queue) > self.max_waiting.get(key, 0):
            self.max_waiting[key] = len(queue)
        return False

    def leave(self, proto: UpstreamProtocol, key: bytes) -> None:
        """A queued client went away: it leaves the queue and never runs."""
        queue = self.queues.get(key)
        if queue is not None and proto in queue:
            queue.remove(proto)

    def release(self, key: bytes) -> None:
        self.running[key] -= 1
        queue = self.queues.get(key)
        while queue and self.running[key] < self.parallel:
            proto = queue.popleft()
            if proto.transport is None:  # gone without connection_lost having run yet
                continue
            self._grant(key)
            proto.begin_granted()

    def _grant(self, key: bytes) -> None:
        running = self.running.get(key, 0) + 1
        self.running[key] = running
        self.grants[key] = self.grants.get(key, 0) + 1
        if running > self.max_running.get(key, 0):
            self.max_running[key] = running

    def report(self) -> bytes:
        """State per model; the maxima restart from the current values after each read."""
        out = {}
        for key in sorted(set(self.running) | set(self.queues)):
            running, waiting = self.running.get(key, 0), len(self.queues.get(key, ()))
            out[key.decode()] = {
                "parallel": self.parallel,
                "running": running,
                "waiting": waiting,
                "max_running": max(self.max_running.get(key, 0), running),
                "max_waiting": max(self.max_waiting.get(key, 0), waiting),
                "grants": self.grants.get(key, 0),
            }
            self.max_running[key], self.max_waiting[key] = running, waiting
        return json.dumps(out, separators=(",", ":")).encode()


def model_key(model: bytes) -> bytes:
    """Ollama's name normalisation, as far as slots need it: the default tag is `latest`."""
    model = model.lower()
    return model if b":" in model.rpartition(b"/")[2] else model + b":latest"


class UpstreamProtocol(asyncio.Protocol):
    """One client connection; requests are served one after the other (keep-alive)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a streamed response is in progress on this connection
        self.timer: asyncio.TimerHandle | None = None
        self.slot: bytes | None = None  # model key of the slot this connection holds
        self.queued: bytes | None = None  # model key of the slot this connection waits for
        self.pending: tuple[bytes, int, float, float, bool] | None = None  # the queued one

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        slots = self.settings.slots
        if slots is not None:
            if self.queued is not None:
                slots.leave(self, self.queued)
                self.queued = self.pending = None
            if self.slot is not None:
                key, self.slot = self.slot, None
                slots.release(key)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self.transport.close()
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            method, _, rest = lines[0].partition(b" ")
            target = rest.partition(b" ")[0]
            headers: dict[bytes, bytes] = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b""):
                self.transport.write(
                    _fixed(
                        b"501 Not Implemented",
                        b"text/plain",
                        b"chunked bodies unsupported",
                        close=True,
                    )
                )
                self.transport.close()
                return
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self._dispatch(method, target.partition(b"?")[0], headers, body)

    def _dispatch(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> None:
        assert self.transport is not None
        if path == b"/api/tags" and method in (b"GET", b"HEAD"):
            self.transport.write(_fixed(b"200 OK", b"application/json; charset=utf-8", TAGS_BODY))
        elif path == b"/api/ps" and method == b"GET":
            self.transport.write(_fixed(b"200 OK", b"application/json; charset=utf-8", PS_BODY))
        elif path == b"/api/version" and method == b"GET":
            self.transport.write(
                _fixed(b"200 OK", b"application/json; charset=utf-8", VERSION_BODY)
            )
        elif path == b"/api/chat" and method == b"POST":
            self._start_chat(headers, body)
        elif path == b"/bench/slots" and method == b"GET" and self.settings.slots is not None:
            self.transport.write(
                _fixed(b"200 OK", b"application/json", self.settings.slots.report())
            )
        else:
            self.transport.write(_fixed(b"404 Not Found", b"text/plain", NOT_FOUND_BODY))

    def _start_chat(self, headers: dict[bytes, bytes], body: bytes) -> None:
        assert self.transport is not None
        limit = 0
        stream = True
        try:
            req = json.loads(body)
            model = str(req.get("model") or "llama3.2").encode()
            limit = int((req.get("options") or {}).get("num_predict") or 0)
            stream = req.get("stream") is not False
        except (ValueError, AttributeError, TypeError):
            model = b"llama3.2"
        chunks = int(headers.get(b"x-bench-chunks", b"0")) or self.settings.chunks
        if 0 < limit < chunks:
            chunks = limit
        delay_ms = headers.get(b"x-bench-delay-ms")
        delay = float(delay_ms) / 1000 if delay_ms is not None else self.settings.delay
        hold = min(float(headers.get(b"x-bench-hold", b"0")), MAX_HOLD)
        self.busy = True
        slots = self.settings.slots
        if slots is not None:
            key = model_key(model)
            if not slots.acquire(self, key):
                self.queued, self.pending = key, (model, chunks, delay, hold, stream)
                return
            self.slot = key
        self._begin(model, chunks, delay, hold, stream)

    def begin_granted(self) -> None:
        """The queued stream got its slot (called by `Slots.release`)."""
        assert self.pending is not None
        self.slot, self.queued = self.queued, None
        pending, self.pending = self.pending, None
        self._begin(*pending)

    def _begin(self, model: bytes, chunks: int, delay: float, hold: float, stream: bool) -> None:
        assert self.transport is not None
        if not stream:
            wait = hold + (chunks - 1) * delay
            if wait > 0:
                loop = asyncio.get_running_loop()
                self.timer = loop.call_later(wait, self._send_whole, model, chunks)
            else:
                self._send_whole(model, chunks)
            return
        CLOCK.tick()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nDate: "
            + CLOCK.date
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        stream = _ChatStream(self, model, chunks, delay, asyncio.get_running_loop().time(), hold)
        stream.send(0)

    def _send_whole(self, model: bytes, chunks: int) -> None:
        if self.transport is None:
            return
        CLOCK.tick()
        answer = whole_answer(model, chunks, time.monotonic_ns())
        self.transport.write(_fixed(b"200 OK", b"application/json; charset=utf-8", answer))
        self.stream_done()

    def stream_done(self) -> None:
        self.busy = False
        self.timer = None
        if self.slot is not None:
            key, self.slot = self.slot, None
            assert self.settings.slots is not None
            self.settings.slots.release(key)
        if self.buf:
            self._serve_buffered()


class _ChatStream:
    """One streamed answer: record k is due at start + k * delay (no drift).

    With `hold`, record 1 is due `hold` seconds after record 0 (an idle stream), and the
    pace resumes from there.
    """

    __slots__ = ("proto", "model", "chunks", "delay", "start", "hold")

    def __init__(
        self,
        proto: UpstreamProtocol,
        model: bytes,
        chunks: int,
        delay: float,
        start: float,
        hold: float,
    ) -> None:
        self.proto, self.model, self.chunks, self.delay, self.start, self.hold = (
            proto,
            model,
            chunks,
            delay,
            start,
            hold,
        )

    def send(self, k: int) -> None:
        transport = self.proto.transport
        if transport is None:
            return
        CLOCK.tick()
        if k >= self.chunks - 1:
            final = final_record(self.model, self.chunks, time.monotonic_ns())
            transport.write(http_chunk(final) + b"0\r\n\r\n")
            self.proto.stream_done()
            return
        transport.write(http_chunk(chat_record(self.model, b"tok", time.monotonic_ns())))
        loop = asyncio.get_running_loop()
        if self.hold > 0:
            self.start = loop.time() + self.hold - (k + 1) * self.delay
            self.hold = 0.0
        elif self.delay <= 0:
            self.proto.timer = loop.call_soon(self.send, k + 1)  # type: ignore[assignment]
            return
        self.proto.timer = loop.call_at(self.start + (k + 1) * self.delay, self.send, k + 1)


async def serve(
    host: str, port: int, settings: Settings, ready: Callable[[int], None] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(settings), host, port, backlog=4096, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"fast-upstream listening on http://{host}:{bound}", flush=True)
    if ready is not None:
        ready(bound)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=50, help="records per /api/chat stream")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between records")
    parser.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="streams per model at once, the rest queued FIFO like Ollama (default 0: unlimited)",
    )
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args(argv)
    settings = Settings(max(1, args.chunks), max(0.0, args.chunk_delay), max(0, args.parallel))
    coro = serve(args.host, args.port, settings)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            asyncio.run(coro)
        else:
            uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
