"""Load clients: wrk for request rates, raw asyncio protocols for streams and idle streams.

Every loop here is bounded in count and in time. Stream probes read the upstream's
`"sent_ns"` stamp (CLOCK_MONOTONIC, system-wide) from each NDJSON record and subtract it from
the receive time, so per-chunk latency is measured end to end without any clock sync.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

T = TypeVar("T")
SENT = re.compile(rb'"sent_ns":(\d+)')
WRK_LUA = Path(__file__).with_name("wrk_report.lua")
CHAT_BODY = json.dumps(
    {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def percentile(values: list[float] | array[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[rank])


# ---------------------------------------------------------------- request rate


@dataclass
class RpsResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non_2xx: int = 0
    socket_errors: int = 0
    tool: str = "wrk"

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.non_2xx == 0


async def run_wrk(wrk: str, url: str, conns: int, seconds: float, auth: str | None) -> RpsResult:
    """One wrk thread (the load generator shares its core with the upstream)."""
    env = {"BENCH_AUTH": auth or "", "PATH": "/usr/bin:/bin"}
    proc = await asyncio.create_subprocess_exec(
        wrk,
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_LUA),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=seconds + 45)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"wrk did not finish against {url}") from None
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {out.decode()[-400:]} {err.decode()[-400:]}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return RpsResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        non_2xx=data["err_status"],
        socket_errors=data["err_connect"]
        + data["err_read"]
        + data["err_write"]
        + data["err_timeout"],
    )


async def run_python_rps(
    host: str,
    port: int,
    path: str,
    conns: int,
    *,
    requests: int,
    seconds: float,
    auth: str | None,
    request: bytes | None = None,
) -> RpsResult:
    """Keep-alive GETs over `conns` connections until `requests` are done or time is up.

    `request`: send these bytes instead of the GET (e.g. a POST; `path` and `auth` unused)."""
    if request is None:
        head = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if auth:
            head += f"Authorization: {auth}\r\n"
        request = (head + "\r\n").encode()
    latencies: list[float] = []
    counters = {"left": requests, "non_2xx": 0, "errors": 0}
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            counters["errors"] += 1
            return
        try:
            while counters["left"] > 0 and time.monotonic() < deadline:
                counters["left"] -= 1
                t0 = time.perf_counter()
                writer.write(request)
                status, body_len = _parse_head(await reader.readuntil(b"\r\n\r\n"))
                if body_len >= 0:
                    await reader.readexactly(body_len)
                else:  # chunked: the gateway streams what it rewrites (listing filters)
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readuntil(b"\r\n")
                latencies.append((time.perf_counter() - t0) * 1000)
                if not 200 <= status < 300:
                    counters["non_2xx"] += 1
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            IndexError,
        ):
            counters["errors"] += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conns))), seconds + 10)
    elapsed = time.perf_counter() - started
    return RpsResult(
        len(latencies),
        elapsed,
        percentile(latencies, 50),
        percentile(latencies, 99),
        counters["non_2xx"],
        counters["errors"],
        tool="python",
    )


def _parse_head(head: bytes) -> tuple[int, int]:
    """Status and body length (-1: chunked) of a response head."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            return status, -1
    return status, length


# ---------------------------------------------------------------- streams


def chat_request(
    host: str,
    port: int,
    auth: str | None,
    *,
    chunks: int,
    delay_ms: float,
    hold: float = 0.0,
    body: bytes = CHAT_BODY,
) -> bytes:
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Bench-Chunks: {chunks}\r\n"
        f"X-Bench-Delay-Ms: {delay_ms}\r\n"
    )
    if hold:
        head += f"X-Bench-Hold: {hold}\r\n"
    if auth:
        head += f"Authorization: {auth}\r\n"
    return (head + "\r\n").encode() + body


class _StreamProbe(asyncio.Protocol):
    """Reads one streamed /api/chat answer, stamping each record's arrival."""

    def __init__(self, request: bytes, latencies: array[int], started_ns: int) -> None:
        self.request = request
        self.latencies = latencies
        self.started_ns = started_ns
        self.ttfc_ns: int | None = None
        self.records = 0
        self.status: int | None = None
        self.head = b""  # the response head, status line and headers
        self.buf = bytearray()
        self.saw_done = False
        self.transport: asyncio.Transport | None = None
        self.finished: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buf += data
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self.buf[:end])
            self.status = int(self.head.split(b" ", 2)[1])
            del self.buf[: end + 4]
            if self.status != 200:
                self._finish(f"status {self.status}")
                return
        cut = self.buf.rfind(b"\n")
        if cut < 0:
            return
        segment = bytes(self.buf[: cut + 1])
        del self.buf[: cut + 1]
        for match in SENT.finditer(segment):
            self.latencies.append(now - int(match.group(1)))
            self.records += 1
        if self.records and self.ttfc_ns is None:
            self.ttfc_ns = now - self.started_ns
            if not self.established.done():
                self.established.set_result(None)
        if b'"done":true' in segment:
            self.saw_done = True
        if self.saw_done and segment.endswith(b"0\r\n\r\n"):
            self._finish("ok")

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("ok" if self.saw_done else "closed early")
        if not self.established.done():
            self.established.set_exception(ConnectionError("closed before the first record"))

    def _finish(self, outcome: str) -> None:
        if not self.finished.done():
            self.finished.set_result(outcome)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


@dataclass
class StreamResult:
    streams: int
    completed: int = 0
    records: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    ttfc_ms: list[float] = field(default_factory=list)
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    cpu_seconds: float | None = None  # the proxy's CPU time during the run

    def merge(self, other: StreamResult) -> None:
        self.streams += other.streams
        self.completed += other.completed
        self.records += other.records
        for key, n in other.failures.items():
            self.failures[key] = self.failures.get(key, 0) + n
        self.ttfc_ms += other.ttfc_ms
        self.latencies_ns.extend(other.latencies_ns)
        if other.cpu_seconds is not None:
            self.cpu_seconds = (self.cpu_seconds or 0.0) + other.cpu_seconds

    def chunk_ms(self, q: float) -> float:
        return percentile(self.latencies_ns, q) / 1e6

    @property
    def cpu_per_1000(self) -> float | None:
        if self.cpu_seconds is None or not self.records:
            return None
        return self.cpu_seconds / self.records * 1000


async def run_streams(
    host: str,
    port: int,
    n: int,
    *,
    chunks: int,
    delay_ms: float,
    auth: str | None,
    time_limit: float,
) -> StreamResult:
    """`n` concurrent streams; their starts are spread over one inter-chunk delay so that the
    upstream's records are not all sent in the same instant (independent users)."""
    loop = asyncio.get_running_loop()
    request = chat_request(host, port, auth, chunks=chunks, delay_ms=delay_ms)
    result = StreamResult(streams=n)
    spread = delay_ms / 1000

    async def one(i: int) -> None:
        await asyncio.sleep(spread * i / n)
        latencies: array[int] = array("q")
        started = time.monotonic_ns()
        try:
            transport, probe = await loop.create_connection(
                lambda: _StreamProbe(request, latencies, started), host, port
            )
        except OSError as exc:
            count_failure(result.failures, f"connect: {exc.strerror or exc}")
            return
        try:
            outcome = await probe.finished
        finally:
            if probe.finished.done():
                transport.close()
            else:
                transport.abort()
        result.records += probe.records
        result.latencies_ns.extend(latencies)
        if probe.ttfc_ns is not None:
            result.ttfc_ms.append(probe.ttfc_ns / 1e6)
        if outcome == "ok" and probe.records == chunks:
            result.completed += 1
        else:
            count_failure(
                result.failures, outcome if outcome != "ok" else f"{probe.records} records"
            )

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await wait_counting(tasks, time_limit, result.failures)
    return result


async def wait_counting(
    tasks: list[asyncio.Future[Any]], time_limit: float, failures: dict[str, int]
) -> None:
    """Wait for `tasks` up to `time_limit`; cancel the rest; count what failed, and how."""
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for task in pending:
        task.cancel()
    if pending:
        count_failure(failures, "timed out", len(pending))
        await asyncio.wait(pending, timeout=5)
    for task in done:
        if task.exception() is not None:
            count_failure(failures, type(task.exception()).__name__)


def count_probe(failures: dict[str, int], outcome: str, records: int) -> None:
    """A stream that did not complete: its outcome, or how many records it got."""
    count_failure(failures, outcome if outcome != "ok" else f"{records} records")


def count_failure(failures: dict[str, int], key: str, n: int = 1) -> None:
    failures[key] = failures.get(key, 0) + n


# ---------------------------------------------------------------- idle streams


@dataclass
class IdleResult:
    wanted: int
    established: int
    measured: Any  # what `measure` returned while every stream was open


async def hold_streams(
    host: str,
    port: int,
    n: int,
    *,
    auth: str | None,
    hold: float,
    measure: Callable[[], Awaitable[T]],
    parallel_connects: int = 128,
    time_limit: float = 60.0,
) -> IdleResult:
    """Open `n` streams whose upstream sends one record and then nothing; with all of them
    open (or after `time_limit`), call `measure`; then close every client connection."""
    loop = asyncio.get_running_loop()
    request = chat_request(host, port, auth, chunks=2, delay_ms=0, hold=hold)
    gate = asyncio.Semaphore(parallel_connects)
    transports: list[asyncio.Transport] = []
    established = 0

    async def one() -> None:
        nonlocal established
        async with gate:
            transport, probe = await loop.create_connection(
                lambda: _StreamProbe(request, array("q"), time.monotonic_ns()), host, port
            )
            transports.append(transport)
            await probe.established
        established += 1

    tasks = [asyncio.ensure_future(one()) for _ in range(n)]
    try:
        await asyncio.wait(tasks, timeout=time_limit)
        measured = await measure()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
        for transport in transports:
            transport.abort()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: connect failures are counted as not established
    return IdleResult(n, established, measured)
