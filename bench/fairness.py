"""Fair queue benchmark: a newcomer's wait, weighted shares, the scheduler's own cost.

    .venv/bin/python bench/fairness.py [--quick | --smoke] [--parallel 1] [--plumbing]
        [--out bench/results/fairness.md]

Starts the fast upstream (bench/fast_upstream.py) with Ollama-like slots (`--parallel P`: P
streams per model at once, the rest queued FIFO, no depth limit) and two gateways in front of
it (`python -m gateway serve`): one with `upstream.slots: P` for the fairness scenarios, one
reloaded (SIGHUP) between `slots: 0` and `slots: 4` for the cost of the scheduler. Then, on
127.0.0.1:

1. Newcomer: user A keeps 24 long streams in flight (re-sending as each ends) while user B
   sends one short request every few generations; B's time to first record, p50/p99, through
   the gateway and straight to the upstream (same upstream, same load).
2. Weighted share: users of weight 1 and 3 both keep more requests in flight than there are
   slots; the tokens (streamed records) each receives over a window, and their ratio.
3. Scheduler cost: uncontended sequential short streams through `slots: 0` and `slots: 4`,
   in alternating blocks; the gateway's CPU time per request and the request time, each as
   the median difference between paired blocks, in µs.

Prints one markdown report with PASS/FAIL per target (also written to `--out`). `--plumbing`
leaves every scheduler key out of the gateway configs (for a gateway without the scheduler):
the harness runs end to end and the verdicts read n/a. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load, procs  # noqa: E402
from bench.load import count_failure  # noqa: E402
from bench.procs import Service, emit, run_bench  # noqa: E402

HOST = "127.0.0.1"
MODEL = "llama3.2"
COST_SLOTS = 4  # the `slots` of the gateway whose cost is compared with `slots: 0`
QUEUE_DUR = re.compile(rb"(?i)server-timing:[^\r\n]*\bqueue;dur=([0-9.]+)")

# Targets (issue 11 item 11).
B_P99_SLACK_MS = 50.0  # B's p99 time to first record <= one generation + this
B_MIN_SPEEDUP = 10.0  # ... and at least this many times better than straight to the upstream
WEIGHTS = (1, 3)
SHARE_TOLERANCE = 0.15  # tokens heavy/light within 15% of 3
COST_MAX_US = 50.0  # scheduler's own cost per uncontended request


@dataclass(frozen=True)
class Plan:
    mode: str
    a_streams: int  # user A's streams kept in flight
    long_chunks: int  # records of A's generation: it lasts (long_chunks - 1) x delay
    short_chunks: int  # records of B's request
    delay_ms: float  # between records
    b_every: float  # seconds between B's requests
    gateway_seconds: float  # B sending through the gateway
    direct_seconds: float  # B sending straight to the upstream (each waits ~24 generations)
    share_chunks: int
    share_warm: float
    share_seconds: float  # the window over which tokens are counted
    cost_block: int  # requests per block
    cost_blocks: int  # blocks per gateway, alternating between the two gateways

    @property
    def generation_s(self) -> float:
        return (self.long_chunks - 1) * self.delay_ms / 1000


PLANS = {
    "full": Plan("full", 24, 51, 5, 10.0, 1.5, 60.0, 30.0, 11, 2.0, 40.0, 200, 60),
    "quick": Plan("quick", 24, 21, 5, 10.0, 0.6, 15.0, 8.0, 11, 1.0, 12.0, 100, 30),
    "smoke": Plan("smoke", 24, 6, 3, 10.0, 0.25, 2.0, 1.2, 6, 0.5, 2.0, 50, 2),
}


# ---------------------------------------------------------------- config and users


@dataclass(frozen=True)
class User:
    name: str
    role: str
    key: str

    @property
    def auth(self) -> str:
        return f"Bearer {self.key}"


def make_users() -> dict[str, User]:
    roles = {"a": "user", "b": "user", "light": "w1", "heavy": "w3"}
    return {n: User(f"bench-{n}", r, f"ogw_{secrets.token_urlsafe(24)}") for n, r in roles.items()}


def fairness_config(
    port: int, upstream_port: int, users: dict[str, User], *, slots: int | None
) -> dict[str, Any]:
    """API-key users (A and B with role `user`; the weighted pair with roles w1 and w3), the
    built-in route table, metrics and the JSON access log. `slots=None` (--plumbing): no
    scheduler key at all, for a gateway that does not know them."""
    upstream: dict[str, Any] = {"url": f"http://{HOST}:{upstream_port}"}
    roles: dict[str, dict[str, Any]] = {
        "user": {"models": ["*"]},
        "w1": {"models": ["*"]},
        "w3": {"models": ["*"]},
        "admin": {"models": ["*"]},
    }
    config: dict[str, Any] = {
        "listen": f"{HOST}:{port}",
        "upstream": upstream,
        "auth": {
            "api_keys": [
                {
                    "name": u.name,
                    "sha256": hashlib.sha256(u.key.encode()).hexdigest(),
                    "user": u.name,
                    "roles": [u.role],
                }
                for u in users.values()
            ]
        },
        "roles": roles,
        "logging": {"level": "info", "format": "json", "access_log": True},
        "metrics": {"enabled": True, "path": "/metrics", "roles": ["admin"]},
    }
    if slots is not None:
        upstream["slots"] = slots
        roles["user"]["weight"] = 1
        roles["w1"]["weight"], roles["w3"]["weight"] = WEIGHTS
        config["scheduler"] = {"max_queue_per_user": 256, "max_queue": 4096, "queue_timeout": 300}
    return config


def chat_body(chunks: int) -> bytes:
    """A streamed chat whose num_predict tells the gateway how long it will be."""
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "options": {"num_predict": chunks},
        }
    ).encode()


# ---------------------------------------------------------------- clients


@dataclass
class Backlog:
    """One user's streams kept in flight: each re-sent as soon as it ends."""

    done_records: int = 0
    completed: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    active: set[load._StreamProbe] = field(default_factory=set)
    transports: set[Any] = field(default_factory=set)

    def records(self) -> int:
        """Records received so far, streams in progress included."""
        return self.done_records + sum(p.records for p in self.active)


async def one_stream(
    port: int, request: bytes, on_start: Callable[[load._StreamProbe, Any], None] | None = None
) -> tuple[load._StreamProbe, str]:
    """One request on a fresh connection; returns its probe and outcome."""
    loop = asyncio.get_running_loop()
    probe: load._StreamProbe | None = None

    def factory() -> load._StreamProbe:
        nonlocal probe
        probe = load._StreamProbe(request, array("q"), time.monotonic_ns())
        return probe

    transport, _ = await loop.create_connection(factory, HOST, port)
    assert probe is not None
    if on_start is not None:
        on_start(probe, transport)
    try:
        outcome = await probe.finished
    finally:
        if probe.finished.done():
            transport.close()
        else:
            transport.abort()
        if probe.established.done() and not probe.established.cancelled():
            probe.established.exception()  # retrieved: closed before its first record
    return probe, outcome


async def keep_backlogged(
    port: int, request: bytes, n: int, chunks: int, stop: asyncio.Event, into: Backlog
) -> None:
    """`n` streams in flight until `stop`; then every one still open is dropped."""

    async def worker() -> None:
        while not stop.is_set():
            holder: list[tuple[load._StreamProbe, Any]] = []

            def started(
                probe: load._StreamProbe,
                transport: Any,
                holder: list[tuple[load._StreamProbe, Any]] = holder,
            ) -> None:
                holder.append((probe, transport))
                into.active.add(probe)
                into.transports.add(transport)

            try:
                probe, outcome = await one_stream(port, request, started)
            except OSError as exc:
                count_failure(into.failures, f"connect: {exc.strerror or exc}")
                await asyncio.sleep(0.05)
                continue
            finally:
                for p, t in holder:
                    into.active.discard(p)
                    into.transports.discard(t)
                    into.done_records += p.records
            if outcome == "ok" and probe.records == chunks:
                into.completed += 1
            elif not stop.is_set():
                count_failure(
                    into.failures, outcome if outcome != "ok" else f"{probe.records} records"
                )
                await asyncio.sleep(0.05)  # e.g. a 429: do not spin

    tasks = [asyncio.ensure_future(worker()) for _ in range(n)]
    await stop.wait()
    for transport in list(into.transports):
        transport.abort()  # the clients leave: queued requests must leave the queue
    done, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    for task in done:
        if task.exception() is not None:
            count_failure(into.failures, type(task.exception()).__name__)


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """What a log file gained since `offset`, and the new offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    return data, offset + len(data)


@dataclass
class Newcomer:
    label: str
    sent: int = 0
    ttfb_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # Server-Timing queue;dur
    failures: dict[str, int] = field(default_factory=dict)
    a: Backlog = field(default_factory=Backlog)
    upstream: dict[str, Any] = field(default_factory=dict)  # /bench/slots after the run

    def p(self, q: float) -> float:
        return load.percentile(self.ttfb_ms, q)


@dataclass
class Share:
    light: int = 0  # records in the window
    heavy: int = 0
    backlogs: dict[str, Backlog] = field(default_factory=dict)
    upstream: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.heavy / self.light if self.light else None


@dataclass
class Cost:
    """Per gateway, one value per block (blocks of the two gateways alternate, paired by index)."""

    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # gateway CPU per request
    p50_us: dict[str, list[float]] = field(default_factory=dict)  # request time, block median
    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def median(self, name: str, which: str) -> float:
        return load.percentile(getattr(self, which).get(name) or [], 50)

    def added(self, base: str, other: str, which: str, q: float = 50) -> float | None:
        """Percentile q over block pairs of (other - base): slow drifts of a shared machine
        cancel; the median is the estimate, p25..p75 its spread (the noise floor)."""
        a, b = getattr(self, which).get(base) or [], getattr(self, which).get(other) or []
        pairs = [y - x for x, y in zip(a, b, strict=False)]
        return load.percentile(pairs, q) if pairs else None


# ---------------------------------------------------------------- the run


class FairnessBench:
    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args, self.plan, self.workdir = args, plan, workdir
        self.cpus = procs.Cpus.plan(not args.no_pin)
        self.users = make_users()
        self.services: list[Service] = []
        self.upstream: Service | None = None
        self.fair: Service | None = None
        self.cost_gateway: Service | None = None
        self.cost_log_offset = 0
        self.t0 = time.monotonic()

    def start(self) -> None:
        procs.raise_nofile()
        if self.cpus.load is not None:
            os.sched_setaffinity(0, self.cpus.load)  # children inherit: the upstream
        self.upstream = procs.start_upstream(
            self.workdir,
            self.cpus.load,
            chunks=self.plan.long_chunks,
            delay_ms=self.plan.delay_ms,
            parallel=self.args.parallel,
        )
        self.services.append(self.upstream)
        plumbing = self.args.plumbing
        gateways = [
            ("gateway-fair", None if plumbing else self.args.parallel),
            ("gateway-cost", None if plumbing else 0),  # reloaded between slots 0 and 4
        ]
        for name, slots in gateways:
            up = self.upstream.port

            def config_for(port: int, slots: int | None = slots, up: int = up) -> dict[str, Any]:
                return fairness_config(port, up, self.users, slots=slots)

            try:
                service = procs.start_gateway(
                    self.workdir,
                    self.cpus.proxy,
                    name=name,
                    loop="uvloop",
                    upstream_port=up,
                    htpasswd=None,
                    config_for=config_for,
                )
            except RuntimeError as exc:
                if not plumbing and "unknown key" in str(exc):
                    raise RuntimeError(
                        f"{exc}\nThis gateway has no scheduler yet (upstream.slots, "
                        "roles.*.weight): run with --plumbing to check the harness only."
                    ) from None
                raise
            self.services.append(service)
            if name == "gateway-fair":
                self.fair = service
            else:
                self.cost_gateway = service

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def progress(self, what: str) -> None:
        if not self.args.silent:
            print(
                f"[fairness {time.monotonic() - self.t0:6.1f}s] {what}", file=sys.stderr, flush=True
            )

    async def upstream_slots(self) -> dict[str, Any]:
        """The upstream's slot state per model (its maxima restart after each read)."""
        assert self.upstream is not None
        reader, writer = await asyncio.open_connection(HOST, self.upstream.port)
        try:
            writer.write(f"GET /bench/slots HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            data: dict[str, Any] = json.loads(await reader.readexactly(length))
            return data
        finally:
            writer.close()

    async def upstream_idle(self, limit: float = 15.0) -> None:
        """Wait until the upstream runs and queues nothing (the last phase's clients left)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            state = await self.upstream_slots()
            if all(m["running"] == 0 and m["waiting"] == 0 for m in state.values()):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"upstream still busy after {limit:g} s: {state}")

    # ------------------------------------------------------------ 1. newcomer

    async def newcomer(self, label: str, port: int, seconds: float) -> Newcomer:
        plan = self.plan
        result = Newcomer(label)
        await self.upstream_idle()
        await self.upstream_slots()  # restart the upstream's maxima
        a_req = load.chat_request(
            HOST,
            port,
            self.users["a"].auth,
            chunks=plan.long_chunks,
            delay_ms=plan.delay_ms,
            body=chat_body(plan.long_chunks),
        )
        b_req = load.chat_request(
            HOST,
            port,
            self.users["b"].auth,
            chunks=plan.short_chunks,
            delay_ms=plan.delay_ms,
            body=chat_body(plan.short_chunks),
        )
        stop_a = asyncio.Event()
        backlog = asyncio.ensure_future(
            keep_backlogged(port, a_req, plan.a_streams, plan.long_chunks, stop_a, result.a)
        )
        await asyncio.sleep(2 * plan.generation_s + 0.2)  # A's streams queued everywhere

        async def one_b() -> None:
            result.sent += 1
            try:
                probe, outcome = await one_stream(port, b_req)
            except OSError as exc:
                count_failure(result.failures, f"connect: {exc.strerror or exc}")
                return
            if outcome == "ok" and probe.records == plan.short_chunks:
                assert probe.ttfc_ns is not None
                result.ttfb_ms.append(probe.ttfc_ns / 1e6)
                if m := QUEUE_DUR.search(probe.head):
                    result.queue_ms.append(float(m.group(1)))
            else:
                count_failure(
                    result.failures, outcome if outcome != "ok" else f"{probe.records} records"
                )

        b_tasks: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        k = 0
        while loop.time() - start < seconds:
            b_tasks.append(asyncio.ensure_future(one_b()))
            k += 1
            await asyncio.sleep(max(0.0, start + k * plan.b_every - loop.time()))
        # Straight to the upstream each of B's requests waits behind A's whole queue.
        limit = (plan.a_streams + len(b_tasks) + 2) * plan.generation_s * 2 + 10
        await load.wait_counting(b_tasks, limit, result.failures)
        result.upstream = (await self.upstream_slots()).get(f"{MODEL}:latest", {})
        stop_a.set()
        await backlog
        return result

    # ------------------------------------------------------------ 2. weighted share

    async def share(self, port: int) -> Share:
        plan = self.plan
        result = Share()
        await self.upstream_idle()
        await self.upstream_slots()
        # Each user keeps more in flight than there are slots: both always have some waiting.
        n = max(8, 4 * self.args.parallel)
        stop = asyncio.Event()
        tasks = []
        for who in ("light", "heavy"):
            req = load.chat_request(
                HOST,
                port,
                self.users[who].auth,
                chunks=plan.share_chunks,
                delay_ms=plan.delay_ms,
                body=chat_body(plan.share_chunks),
            )
            result.backlogs[who] = Backlog()
            tasks.append(
                asyncio.ensure_future(
                    keep_backlogged(port, req, n, plan.share_chunks, stop, result.backlogs[who])
                )
            )
        await asyncio.sleep(plan.share_warm)
        light0, heavy0 = (result.backlogs[w].records() for w in ("light", "heavy"))
        await asyncio.sleep(plan.share_seconds)
        result.light = result.backlogs["light"].records() - light0
        result.heavy = result.backlogs["heavy"].records() - heavy0
        result.upstream = (await self.upstream_slots()).get(f"{MODEL}:latest", {})
        stop.set()
        await asyncio.gather(*tasks)
        return result

    # ------------------------------------------------------------ 3. scheduler cost

    async def cost(self) -> Cost:
        plan = self.plan
        result = Cost()
        service = self.cost_gateway
        assert service is not None and self.upstream is not None
        await self.upstream_idle()

        async def run(requests: int) -> load.RpsResult:
            req = load.chat_request(
                HOST,
                service.port,
                self.users["a"].auth,
                chunks=2,
                delay_ms=0,
                body=chat_body(2),
            )
            return await load.run_python_rps(
                HOST,
                service.port,
                "/api/chat",
                1,
                requests=requests,
                seconds=requests * 0.02 + 30,
                auth=None,
                request=req,
            )

        await run(max(50, plan.cost_block))  # warm-up, not counted
        self.progress(f"cost: {plan.cost_blocks} blocks of {plan.cost_block} per setting")
        for block in range(plan.cost_blocks):
            order = [0, COST_SLOTS] if block % 2 == 0 else [COST_SLOTS, 0]  # neither always first
            for slots in order:
                name = f"slots: {slots}"
                await self.reload_cost_gateway(slots)
                await run(max(20, plan.cost_block // 10))  # after the reload: warm, not counted
                cpu_before = service.cpu_seconds()
                r = await run(plan.cost_block)
                cpu = service.cpu_seconds() - cpu_before
                result.cpu_us.setdefault(name, []).append(cpu / max(1, r.requests) * 1e6)
                result.p50_us.setdefault(name, []).append(r.p50_ms * 1000)
                result.requests[name] = result.requests.get(name, 0) + r.requests
                result.errors[name] = result.errors.get(name, 0) + r.non_2xx + r.socket_errors
        return result

    async def reload_cost_gateway(self, slots: int) -> None:
        """Rewrite the cost gateway's config with `slots` and SIGHUP it; wait for the reload.

        One process for both settings: two processes differ by tens of µs per request on
        their own (memory layout, CPU caches), more than the cost being measured."""
        service = self.cost_gateway
        assert service is not None and self.upstream is not None
        config = fairness_config(
            service.port,
            self.upstream.port,
            self.users,
            slots=None if self.args.plumbing else slots,
        )
        (self.workdir / "gateway-cost.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        offset = service.log.stat().st_size
        os.kill(service.popen.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        seen = b""
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            data, offset = _read_from(service.log, offset)
            seen += data
            if b"config reloaded from" in seen:
                return
            if b"reload refused" in seen:
                tail = seen.decode(errors="replace")[-2000:]
                raise RuntimeError(f"the gateway refused slots: {slots}:\n{tail}")
        raise RuntimeError(f"no reload of the cost gateway within 10 s (slots: {slots})")

    async def run(self) -> str:
        assert self.upstream is not None and self.fair is not None
        self.t0 = time.monotonic()
        phases = self.args.phases
        via, direct, share, cost = Newcomer("gateway"), Newcomer("direct"), Share(), Cost()
        if "newcomer" in phases:
            self.progress("newcomer through the gateway")
            via = await self.newcomer("gateway", self.fair.port, self.plan.gateway_seconds)
            self.progress("newcomer straight to the upstream")
            direct = await self.newcomer("direct", self.upstream.port, self.plan.direct_seconds)
        if "share" in phases:
            self.progress("weighted share")
            share = await self.share(self.fair.port)
        if "cost" in phases:
            self.progress("scheduler cost")
            cost = await self.cost()
        elapsed = time.monotonic() - self.t0
        notes = [
            f"command: `{shlex.join([sys.executable, *sys.argv])}`",
            f"machine: {os.cpu_count()} CPUs; {self.cpus.describe()}; measured in {elapsed:.0f} s",
            f"upstream: bench/fast_upstream.py --parallel {self.args.parallel} (FIFO per model, "
            f"no depth limit); records {self.plan.delay_ms:g} ms apart",
            f"gateways (uvloop, API keys, metrics, JSON access log): `slots: {self.args.parallel}`"
            f" for 1 and 2; for 3 one gateway reloaded (SIGHUP) between `slots: 0` and "
            f"`slots: {COST_SLOTS}`",
        ]
        if self.args.plumbing:
            notes.append(
                "**--plumbing**: no scheduler key in any gateway config (no slots, weights or "
                "queue): the harness ran, the numbers say nothing about fairness"
            )
        return render(self.plan, self.args, notes, via, direct, share, cost)


# ---------------------------------------------------------------- report


def _f(value: float | None, digits: int = 1) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _failures(failures: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in failures.items()) or "0"


def render(
    plan: Plan,
    args: argparse.Namespace,
    notes: list[str],
    via: Newcomer,
    direct: Newcomer,
    share: Share,
    cost: Cost,
) -> str:
    gen_ms = plan.generation_s * 1000
    title = f"ollama-gateway fairness bench ({plan.mode}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]

    lines += [
        f"## Newcomer: A keeps {plan.a_streams} streams of {plan.long_chunks} records "
        f"(one generation = {gen_ms:g} ms) in flight, B sends {plan.short_chunks} records "
        f"every {plan.b_every:g} s",
        "",
        "TTFB = from B's connect to its first record. Upstream columns: the fast upstream's own "
        "slot state during the run (through a gateway that keeps its slots, nothing waits there).",
        "",
        "| path | B sent | B answered | TTFB p50 ms | TTFB p99 ms | TTFB max ms "
        "| queue p50 ms (Server-Timing) | A completed | failures (B; A) "
        "| upstream max running | upstream max waiting |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in (via, direct):
        lines.append(
            f"| {r.label} | {r.sent} | {len(r.ttfb_ms)} | {_f(r.p(50))} | {_f(r.p(99))} | "
            f"{_f(max(r.ttfb_ms) if r.ttfb_ms else None)} | "
            f"{_f(load.percentile(r.queue_ms, 50) if r.queue_ms else None)} | {r.a.completed} | "
            f"{_failures(r.failures)}; {_failures(r.a.failures)} | "
            f"{r.upstream.get('max_running', '-')} | {r.upstream.get('max_waiting', '-')} |"
        )
    speedup = direct.p(99) / via.p(99) if via.ttfb_ms and direct.ttfb_ms else None
    speedup50 = direct.p(50) / via.p(50) if via.ttfb_ms and direct.ttfb_ms else None
    lines += ["", f"Direct / gateway: p50 {_f(speedup50)}x, p99 {_f(speedup)}x.", ""]

    lines += [
        f"## Weighted share: weights {WEIGHTS[0]} and {WEIGHTS[1]}, both backlogged, "
        f"streams of {plan.share_chunks} records, {plan.share_seconds:g} s window",
        "",
        "| user | weight | tokens (records) in the window | streams completed | failures |",
        "|---|---:|---:|---:|---|",
    ]
    for who, weight, tokens in (
        ("light", WEIGHTS[0], share.light),
        ("heavy", WEIGHTS[1], share.heavy),
    ):
        b = share.backlogs.get(who, Backlog())
        lines.append(
            f"| bench-{who} | {weight} | {tokens:,} | {b.completed} | {_failures(b.failures)} |"
        )
    lines += ["", f"Ratio heavy / light: {_f(share.ratio, 2)}.", ""]

    lines += [
        f"## Scheduler cost without contention: sequential short streams, 1 connection, "
        f"{plan.cost_blocks} alternating blocks of {plan.cost_block:,} per setting",
        "",
        "One gateway process, reloaded (SIGHUP) between the two settings before each block. "
        "CPU = the gateway process' CPU time (all threads) per request; request time = the "
        "client's, per block at p50. Both: median over blocks.",
        "",
        "| setting | requests | errors | gateway CPU µs / request | request p50 µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in cost.p50_us:
        lines.append(
            f"| {name} | {cost.requests.get(name, 0):,} | {cost.errors.get(name, 0)} | "
            f"{_f(cost.median(name, 'cpu_us'))} | {_f(cost.median(name, 'p50_us'))} |"
        )
    names = list(cost.p50_us)

    def diff(which: str, q: float = 50) -> float | None:
        return cost.added(names[0], names[1], which, q) if len(names) == 2 else None

    added = diff("cpu_us")
    lines += [
        "",
        f"Added by the scheduler (median of paired blocks, p25..p75 in brackets): {_f(added)} "
        f"({_f(diff('cpu_us', 25))}..{_f(diff('cpu_us', 75))}) µs of gateway CPU per request; "
        f"{_f(diff('p50_us'))} ({_f(diff('p50_us', 25))}..{_f(diff('p50_us', 75))}) µs of "
        "request time at p50.",
        "",
    ]

    def verdict(ok: bool | None) -> str:
        if args.plumbing:
            return "n/a (--plumbing)"
        return "n/a (not measured)" if ok is None else ("PASS" if ok else "FAIL")

    via_p99 = via.p(99) if via.ttfb_ms else None
    b_limit = gen_ms + B_P99_SLACK_MS
    share_ok = None if share.ratio is None else abs(share.ratio / 3 - 1) <= SHARE_TOLERANCE
    up_waiting = via.upstream.get("max_waiting")
    rows = [
        (
            "B's TTFB p99 through the gateway",
            f"{_f(via_p99)} ms",
            f"<= {b_limit:g} ms (one generation + {B_P99_SLACK_MS:g})",
            None if via_p99 is None or via.failures else via_p99 <= b_limit,
        ),
        (
            "B's TTFB p99: straight to the upstream / through the gateway",
            f"{_f(speedup)}x",
            f">= {B_MIN_SPEEDUP:g}x",
            None if speedup is None else speedup >= B_MIN_SPEEDUP,
        ),
        (
            f"tokens, weight {WEIGHTS[1]} / weight {WEIGHTS[0]}, both backlogged",
            _f(share.ratio, 2),
            f"{WEIGHTS[1] / WEIGHTS[0]:g} ± {SHARE_TOLERANCE:.0%}",
            share_ok,
        ),
        (
            f"scheduler cost per uncontended request: gateway CPU, slots {COST_SLOTS} - slots 0",
            f"{_f(added)} µs",
            f"<= {COST_MAX_US:g} µs",
            None if added is None or math.isnan(added) else added <= COST_MAX_US,
        ),
        (
            "the upstream's own queue through the gateway (max waiting)",
            str(up_waiting if up_waiting is not None else "-"),
            "0",
            None if up_waiting is None else up_waiting == 0,
        ),
    ]
    lines += ["## Targets", "", "| target | measured | limit | result |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {m} | {lim} | {verdict(ok)} |" for name, m, lim, ok in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter phases (about 1 minute)")
    size.add_argument("--smoke", action="store_true", help="tiny run that checks the harness")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="the upstream's slots per model (OLLAMA_NUM_PARALLEL) and the gateway's `slots` "
        "(default 1, Ollama's default)",
    )
    parser.add_argument(
        "--plumbing",
        action="store_true",
        help="no scheduler keys in the gateway configs (a gateway without the scheduler)",
    )
    parser.add_argument(
        "--phases",
        default="newcomer,share,cost",
        help="comma-separated subset of newcomer, share, cost (default: all three)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.parallel < 1:
        parser.error("--parallel must be at least 1")
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if bad := args.phases - {"newcomer", "share", "cost"}:
        parser.error(f"unknown phase(s): {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    workdir = Path(tempfile.mkdtemp(prefix="gateway-fairness-"))
    text = run_bench(FairnessBench(args, plan, workdir), workdir, keep_workdir=args.keep_workdir)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
