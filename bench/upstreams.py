"""Several upstreams: the routing cost of two servers against one, and a failover run.

    .venv/bin/python bench/upstreams.py [--quick | --smoke] [--phases cost,failover]
        [--out bench/results/upstreams.md]

Starts two fast upstreams (bench/fast_upstream.py, each answering `/api/tags`, `/api/ps` and
`/api/version` in Ollama's shapes, `llama3.2` installed and loaded) and one gateway
(`python -m gateway serve`, uvloop, API keys, metrics, JSON access log). Then, on 127.0.0.1:

1. Routing cost: the same load (`/api/chat` on one model, non-streamed and short streamed, on
   1 and 8 connections) through the gateway configured with `upstream:` (one fast upstream) and
   with `upstreams:` (both, each listing the model), in alternating blocks; the gateway is
   reloaded (SIGHUP) between the two configs, so one process serves both (two processes
   differ by tens of µs per request on their own). Per block: the gateway's CPU time per
   request; the result per load is the median over block pairs of (two / one).
2. Failover: the gateway reloaded to both upstreams (`slots` each), several users keep short
   requests going (streamed and not, alternately); one upstream is SIGKILLed mid-run and the
   load goes on. Every request is classified: completed, lost (no response head, or an error
   status: what failover must prevent), cut (a 200 head reached the client, then the stream
   stopped: expected for the streams the dead server was sending, never replayed).

Prints one markdown report with PASS/FAIL per target (also written to `--out`). See
bench/README.md.
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import load, procs  # noqa: E402
from bench.fairness import _f, _failures, _read_from  # noqa: E402
from bench.procs import Service, emit, run_bench  # noqa: E402

HOST = "127.0.0.1"
MODEL = "llama3.2"
SERVERS = ("fast-a", "fast-b")  # `upstreams[].name`; fast-b is the one killed
REQUEST_TIMEOUT = 15.0  # a failover run request taking longer counts as lost (or cut)

# Targets (issue 12 item 10).
CPU_RATIO_MAX = 1.10  # gateway CPU per request, two servers / one
LOST_MAX = 0  # requests that had not started streaming and failed anyway


@dataclass(frozen=True)
class Plan:
    mode: str
    cost_block: int  # requests per block
    cost_cycles: int  # blocks per (load, config)
    cost_conns: tuple[int, ...]  # the "uncontended" and "moderate" concurrencies
    cost_chunks: int  # records of a streamed request (the non-streamed one: the same count)
    cost_slots: int  # `slots` per server in the cost configs: never reached, nothing waits
    fo_users: int  # failover: users, each with fo_conns clients
    fo_conns: int
    fo_chunks: int  # records per request
    fo_delay_ms: float  # between records
    fo_slots: int  # `slots` per server in the failover config
    fo_before: float  # seconds of load before the kill
    fo_after: float  # seconds of load after it


PLANS = {
    "full": Plan("full", 300, 30, (1, 8), 5, 32, 6, 2, 11, 10.0, 8, 4.0, 8.0),
    "quick": Plan("quick", 100, 10, (1, 8), 5, 32, 6, 2, 11, 10.0, 8, 2.0, 4.0),
    "smoke": Plan("smoke", 30, 2, (1, 8), 5, 32, 4, 2, 6, 5.0, 8, 1.0, 1.5),
}


# ---------------------------------------------------------------- config


def make_keys(n: int) -> list[str]:
    return [f"ogw_{secrets.token_urlsafe(24)}" for _ in range(n)]


def gateway_config(
    port: int, upstream_ports: list[int], keys: list[str], *, slots: int
) -> dict[str, Any]:
    """API-key users (role `user`), the built-in route table, public metrics, JSON access log;
    `upstream:` for one port, `upstreams:` (named fast-a, fast-b; no `models` globs: the
    catalogue says what each has) for two."""
    config: dict[str, Any] = {"listen": f"{HOST}:{port}"}
    if len(upstream_ports) == 1:
        config["upstream"] = {"url": f"http://{HOST}:{upstream_ports[0]}", "slots": slots}
    else:
        config["upstreams"] = [
            {"name": name, "url": f"http://{HOST}:{p}", "slots": slots}
            for name, p in zip(SERVERS, upstream_ports, strict=True)
        ]
    config |= {
        "scheduler": {"max_queue_per_user": 256, "max_queue": 4096, "queue_timeout": 60},
        "auth": {
            "api_keys": [
                {
                    "name": f"bench-{i}",
                    "sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "user": f"bench-{i}",
                    "roles": ["user"],
                }
                for i, key in enumerate(keys)
            ]
        },
        "roles": {"user": {"models": ["*"]}, "admin": {"models": ["*"]}},
        "logging": {"level": "info", "format": "json", "access_log": True},
        "metrics": {"enabled": True, "path": "/metrics", "public": True},
    }
    return config


def chat_body(chunks: int, *, stream: bool) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
            "options": {"num_predict": chunks},
        }
    ).encode()


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class CostLoad:
    label: str
    stream: bool
    conns: int


@dataclass
class Cost:
    """Per load and config, one value per block (the two configs' blocks paired by index)."""

    cpu_us: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    p50_us: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)

    def median(self, which: str, key: tuple[str, str]) -> float:
        return load.percentile(getattr(self, which).get(key) or [], 50)

    def ratio(self, label: str, q: float = 50) -> float | None:
        """Percentile q over block pairs of (two / one) gateway CPU per request."""
        one, two = self.cpu_us.get((label, "one")) or [], self.cpu_us.get((label, "two")) or []
        pairs = [b / a for a, b in zip(one, two, strict=False) if a > 0]
        return load.percentile(pairs, q) if pairs else None


@dataclass
class Tally:
    """One kind of request (streamed or not) in the failover run."""

    sent: int = 0
    completed: int = 0
    lost: int = 0  # no response head, or an error status
    cut: int = 0  # a 200 head reached the client, then the answer stopped
    cut_no_record: int = 0  # ... before the first record
    garbled: int = 0  # complete, but a wrong record count (a replay would show here)
    at_kill: int = 0  # started before the kill, ended after it
    at_kill_ok: int = 0
    after: int = 0  # started after the kill
    after_ok: int = 0


KINDS = ("streamed", "non-streamed")


@dataclass
class Failover:
    kinds: dict[str, Tally] = field(default_factory=lambda: {k: Tally() for k in KINDS})
    lost: dict[str, int] = field(default_factory=dict)  # reason -> count
    garbled: dict[str, int] = field(default_factory=dict)  # complete but wrong record count
    max_ms_after_kill: float = 0.0  # slowest completed request that ended after the kill
    per_server: dict[str, dict[str, float]] = field(default_factory=dict)  # metrics deltas
    failovers: dict[str, float] = field(default_factory=dict)  # "server: reason" -> count
    ran: bool = False

    @property
    def lost_total(self) -> int:
        return sum(self.lost.values())


# ---------------------------------------------------------------- one request (failover run)


class _Conn:
    """A keep-alive client connection to the gateway, reopened after any failure."""

    def __init__(self, port: int, chunks: int) -> None:
        self.port, self.chunks = port, chunks
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, data: bytes) -> tuple[str, str, int]:
        """(outcome, detail, records): outcome `ok`, `lost` (nothing of an answer, or an error
        status), `cut` (a 200 head, then the answer stopped short) or `garbled` (a stream that
        ended with its `done` record but not `chunks` records: replayed or mixed)."""
        if self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            except OSError as exc:
                return "lost", f"connect: {exc.strerror or exc}", 0
        assert self.reader is not None and self.writer is not None
        reader = self.reader
        try:
            self.writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            return "lost", f"no answer ({type(exc).__name__})", 0
        status, length = load._parse_head(head)
        if status != 200:
            self.close()
            return "lost", f"status {status}", 0
        records, done = 0, False
        try:
            if length >= 0:  # non-streamed: one JSON answer
                body = await reader.readexactly(length)
                records, done = 1, b'"done":true' in body
            else:  # NDJSON, one HTTP chunk per record
                while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                    payload = await reader.readexactly(size + 2)
                    records += payload.count(b'"sent_ns"')
                    done = done or b'"done":true' in payload
                await reader.readuntil(b"\r\n")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.close()
            return "cut", "stream" if length < 0 else "whole", records
        if not done:
            self.close()
            return "cut", "no done record", records
        if length < 0 and records != self.chunks:  # a replay would repeat records
            self.close()
            return "garbled", f"{records} records", records
        return "ok", "", records


# ---------------------------------------------------------------- the run


class UpstreamsBench:
    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args, self.plan, self.workdir = args, plan, workdir
        self.cpus = procs.Cpus.plan(not args.no_pin)
        self.keys = make_keys(max(1, plan.fo_users))
        self.services: list[Service] = []
        self.upstreams: list[Service] = []
        self.gateway: Service | None = None
        self.t0 = time.monotonic()

    def start(self) -> None:
        procs.raise_nofile()
        if self.cpus.load is not None:
            os.sched_setaffinity(0, self.cpus.load)  # children inherit: the upstreams
        for name in SERVERS:
            service = procs.start_upstream(
                self.workdir, self.cpus.load, chunks=self.plan.cost_chunks, delay_ms=0, name=name
            )
            self.services.append(service)
            self.upstreams.append(service)
        first = self.upstreams[0].port
        self.gateway = procs.start_gateway(
            self.workdir,
            self.cpus.proxy,
            name="gateway",
            loop="uvloop",
            upstream_port=first,
            htpasswd=None,
            config_for=lambda port: gateway_config(
                port, [first], self.keys, slots=self.plan.cost_slots
            ),
        )
        self.services.append(self.gateway)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def progress(self, what: str) -> None:
        if not self.args.silent:
            print(
                f"[upstreams {time.monotonic() - self.t0:6.1f}s] {what}",
                file=sys.stderr,
                flush=True,
            )

    async def get(self, path: str) -> tuple[int, bytes]:
        assert self.gateway is not None
        reader, writer = await asyncio.open_connection(HOST, self.gateway.port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status, length = load._parse_head(head)
            if length >= 0:
                return status, await reader.readexactly(length)
            body = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += (await reader.readexactly(size + 2))[:-2]
            return status, body
        finally:
            writer.close()

    async def reload(self, servers: int, slots: int) -> None:
        """Rewrite the gateway's config (`upstream` or `upstreams`), SIGHUP it, wait for the
        reload, and with two servers until both have learnt their catalogue (/readyz)."""
        service = self.gateway
        assert service is not None
        ports = [u.port for u in self.upstreams[:servers]]
        config = gateway_config(service.port, ports, self.keys, slots=slots)
        (self.workdir / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        offset = service.log.stat().st_size
        os.kill(service.popen.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        seen = b""
        while b"config reloaded from" not in seen:
            if b"reload refused" in seen:
                raise RuntimeError(f"the gateway refused the config:\n{seen.decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no reload within 10 s ({servers} upstream(s))")
            await asyncio.sleep(0.02)
            data, offset = _read_from(service.log, offset)
            seen += data
        if servers > 1:
            await self.wait_catalogues(set(SERVERS[:servers]))

    async def wait_catalogues(self, names: set[str], limit: float = 10.0) -> None:
        deadline = time.monotonic() + limit
        body = b""
        while time.monotonic() < deadline:
            _, body = await self.get("/readyz")
            state = json.loads(body).get("upstreams", {})
            if names <= {
                n for n, s in state.items() if s.get("state") == "up" and s.get("models", 0) > 0
            } and all(f"{MODEL}:latest" in state[n].get("loaded", []) for n in names):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the gateway did not learn both catalogues: {body.decode()[:500]}")

    async def metrics(self) -> dict[str, float]:
        """The upstream series of /metrics (public in this config): `name{labels}` -> value."""
        _, body = await self.get("/metrics")
        out = {}
        for line in body.decode().splitlines():
            if line.startswith(
                (
                    "ollama_gateway_upstream_failovers_total",
                    "ollama_gateway_upstream_requests_total",
                )
            ):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    # ------------------------------------------------------------ 1. routing cost

    def cost_loads(self) -> list[CostLoad]:
        loads = []
        for stream in (False, True):
            for conns in self.plan.cost_conns:
                kind = f"streamed, {self.plan.cost_chunks} records" if stream else "non-streamed"
                loads.append(
                    CostLoad(f"{kind}, {conns} conn{'s' if conns > 1 else ''}", stream, conns)
                )
        return loads

    async def cost(self) -> Cost:
        plan = self.plan
        result = Cost()
        service = self.gateway
        assert service is not None
        auth = f"Bearer {self.keys[0]}"

        async def run(lo: CostLoad, requests: int) -> load.RpsResult:
            req = load.chat_request(
                HOST,
                service.port,
                auth,
                chunks=plan.cost_chunks,
                delay_ms=0,
                body=chat_body(plan.cost_chunks, stream=lo.stream),
            )
            return await load.run_python_rps(
                HOST,
                service.port,
                "/api/chat",
                lo.conns,
                requests=requests,
                seconds=requests * 0.02 + 30,
                auth=None,
                request=req,
            )

        loads = self.cost_loads()
        for lo in loads:
            await run(lo, max(50, plan.cost_block))  # warm-up, not counted
        self.progress(
            f"cost: {plan.cost_cycles} cycles of {len(loads)} loads x 2 configs, "
            f"blocks of {plan.cost_block}"
        )
        for cycle in range(plan.cost_cycles):
            order = ["one", "two"] if cycle % 2 == 0 else ["two", "one"]  # neither always first
            turn = cycle % len(loads)  # no load always measured first after a reload
            for config in order:
                servers = 1 if config == "one" or self.args.same else 2
                await self.reload(servers, plan.cost_slots)
                await run(loads[-1], max(50, plan.cost_block // 2))  # settle after the reload
                for lo in loads[turn:] + loads[:turn]:
                    await run(lo, max(20, plan.cost_block // 10))  # warm, not counted
                    cpu_before = service.cpu_seconds()
                    r = await run(lo, plan.cost_block)
                    cpu = service.cpu_seconds() - cpu_before
                    key = (lo.label, config)
                    result.cpu_us.setdefault(key, []).append(cpu / max(1, r.requests) * 1e6)
                    result.p50_us.setdefault(key, []).append(r.p50_ms * 1000)
                    result.requests[key] = result.requests.get(key, 0) + r.requests
                    result.errors[key] = result.errors.get(key, 0) + r.non_2xx + r.socket_errors
        raw = {f"{label} / {config}": v for (label, config), v in result.cpu_us.items()}
        (self.workdir / "cost-blocks.json").write_text(json.dumps(raw, indent=1))
        return result

    # ------------------------------------------------------------ 2. failover

    async def failover(self) -> Failover:
        plan = self.plan
        result = Failover(ran=True)
        gateway = self.gateway
        assert gateway is not None
        await self.reload(2, plan.fo_slots)
        before = await self.metrics()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        kill_at: list[float] = []
        late: list[float] = []

        def request(user: int, stream: bool) -> bytes:
            return load.chat_request(
                HOST,
                gateway.port,
                f"Bearer {self.keys[user]}",
                chunks=plan.fo_chunks,
                delay_ms=plan.fo_delay_ms,
                body=chat_body(plan.fo_chunks, stream=stream),
            )

        async def client(i: int) -> None:
            """Client i of user i % users: a user's two clients are out of phase (one streams
            while the other waits for a whole answer), starts spread over one record delay."""
            user = i % plan.fo_users
            reqs = (request(user, True), request(user, False))
            conn = _Conn(gateway.port, plan.fo_chunks)
            k = i // plan.fo_users
            await asyncio.sleep(plan.fo_delay_ms / 1000 * i / clients_n)
            try:
                while not stop.is_set():
                    stream = k % 2 == 0
                    k += 1
                    tally = result.kinds[KINDS[0] if stream else KINDS[1]]
                    tally.sent += 1
                    t0 = loop.time()
                    try:
                        outcome, detail, records = await asyncio.wait_for(
                            conn.request(reqs[0 if stream else 1]), REQUEST_TIMEOUT
                        )
                    except TimeoutError:
                        conn.close()
                        outcome, detail, records = "lost", "timed out", 0
                    t1 = loop.time()
                    killed = kill_at[0] if kill_at else math.inf
                    if t0 >= killed:
                        tally.after += 1
                        tally.after_ok += outcome == "ok"
                    elif t1 >= killed:
                        tally.at_kill += 1
                        tally.at_kill_ok += outcome == "ok"
                    if outcome == "ok":
                        tally.completed += 1
                        if t1 >= killed:
                            late.append((t1 - t0) * 1000)
                    elif outcome == "cut":
                        tally.cut += 1
                        tally.cut_no_record += records == 0
                    elif outcome == "garbled":
                        tally.garbled += 1
                        result.garbled[detail] = result.garbled.get(detail, 0) + 1
                    else:
                        tally.lost += 1
                        result.lost[detail] = result.lost.get(detail, 0) + 1
                        await asyncio.sleep(0.02)  # never spin on errors
            finally:
                conn.close()

        clients_n = plan.fo_users * plan.fo_conns
        clients = [asyncio.ensure_future(client(i)) for i in range(clients_n)]
        self.progress(
            f"failover: {len(clients)} clients, kill {SERVERS[1]} after {plan.fo_before:g} s"
        )
        await asyncio.sleep(plan.fo_before)
        victim = self.upstreams[1]
        kill_at.append(loop.time())
        os.kill(victim.popen.pid, signal.SIGKILL)
        victim.popen.wait(timeout=5)
        await asyncio.sleep(plan.fo_after)
        stop.set()
        done, pending = await asyncio.wait(clients, timeout=REQUEST_TIMEOUT + 5)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                result.lost[type(task.exception()).__name__] = (
                    result.lost.get(type(task.exception()).__name__, 0) + 1
                )
        result.max_ms_after_kill = max(late, default=0.0)
        after = await self.metrics()
        for series, value in after.items():
            delta = value - before.get(series, 0.0)
            if not delta:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', series))
            if series.startswith("ollama_gateway_upstream_failovers_total"):
                key = f"{labels.get('upstream')}: {labels.get('reason')}"
                result.failovers[key] = result.failovers.get(key, 0) + delta
            else:
                per = result.per_server.setdefault(labels.get("upstream", "?"), {})
                status = labels.get("status", "?")
                per[status] = per.get(status, 0) + delta
        return result

    async def run(self) -> str:
        self.t0 = time.monotonic()
        phases = self.args.phases
        cost, fo = Cost(), Failover()
        if "cost" in phases:
            self.progress("routing cost")
            cost = await self.cost()
        if "failover" in phases:
            self.progress("failover")
            fo = await self.failover()
        elapsed = time.monotonic() - self.t0
        plan = self.plan
        notes = [
            f"command: `{shlex.join([sys.executable, *sys.argv])}`",
            f"machine: {os.cpu_count()} CPUs; {self.cpus.describe()}; measured in {elapsed:.0f} s",
            f"upstreams: 2 x bench/fast_upstream.py ({', '.join(SERVERS)}), each listing "
            f"`{MODEL}` installed and loaded; no `models` globs",
            f"gateway: one process (uvloop, API keys, public metrics, JSON access log) reloaded "
            f"(SIGHUP) between `upstream:` and `upstreams:`; `slots: {plan.cost_slots}` per "
            f"server for the cost (never reached), `slots: {plan.fo_slots}` for the failover",
        ]
        if self.args.same:
            notes.append(
                "**--same**: the 'two' blocks ran with `upstream:` as well (an A/A run): the "
                "ratios show the harness' own noise, the CPU verdicts say nothing"
            )
        return render(plan, notes, self.cost_loads(), cost, fo, same=self.args.same)


# ---------------------------------------------------------------- report


def render(
    plan: Plan,
    notes: list[str],
    loads: list[CostLoad],
    cost: Cost,
    fo: Failover,
    *,
    same: bool = False,
) -> str:
    title = f"ollama-gateway upstreams bench ({plan.mode}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        f"## Routing cost: `upstream:` (one server) vs `upstreams:` (two), {plan.cost_cycles} "
        f"alternating blocks of {plan.cost_block:,} per load and config",
        "",
        "Gateway CPU = the gateway process' CPU time (all threads) per request, median over "
        "blocks; ratio = median over block pairs of (two / one), p25..p75 in brackets. "
        f"Streamed and non-streamed: {plan.cost_chunks} records (tokens), no delay.",
        "",
        "| load | requests (one / two) | errors | CPU µs/req, one | CPU µs/req, two "
        "| ratio two / one | p50 µs, one | p50 µs, two |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lo in loads:
        one, two = (lo.label, "one"), (lo.label, "two")
        ratio = cost.ratio(lo.label)
        lines.append(
            f"| {lo.label} | {cost.requests.get(one, 0):,} / {cost.requests.get(two, 0):,} | "
            f"{cost.errors.get(one, 0) + cost.errors.get(two, 0)} | "
            f"{_f(cost.median('cpu_us', one))} | {_f(cost.median('cpu_us', two))} | "
            f"{_f(ratio, 3)} ({_f(cost.ratio(lo.label, 25), 3)}..{_f(cost.ratio(lo.label, 75), 3)})"
            f" | {_f(cost.median('p50_us', one))} | {_f(cost.median('p50_us', two))} |"
        )
    lines += [""]

    clients = plan.fo_users * plan.fo_conns
    lines += [
        f"## Failover: {clients} clients ({plan.fo_users} users), requests of {plan.fo_chunks} "
        f"records {plan.fo_delay_ms:g} ms apart, streamed and not alternately; "
        f"`{SERVERS[1]}` SIGKILLed after {plan.fo_before:g} s, load for {plan.fo_after:g} s more",
        "",
        "lost = no response head, or an error status (a request that had not started "
        "streaming: failover must save it); cut = a 200 head reached the client, then the "
        "answer stopped (expected for what the dead server was sending; never replayed); "
        "garbled = an answer that ended with its `done` record but not all its records "
        "(a replay elsewhere would show here).",
        "",
        "| request | sent | completed | lost | cut mid-way (before a record) "
        "| garbled | in flight at the kill: ok / all | started after the kill: ok / all |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, t in fo.kinds.items():
        lines.append(
            f"| {kind} | {t.sent} | {t.completed} | {t.lost} | {t.cut} ({t.cut_no_record}) | "
            f"{t.garbled} | {t.at_kill_ok} / {t.at_kill} | {t.after_ok} / {t.after} |"
        )
    lines += [
        "",
        f"Slowest completed request that ended after the kill: "
        f"{_f(fo.max_ms_after_kill if fo.ran else None)} ms.",
        "",
        f"Lost by reason: {_failures(fo.lost)}. Streams with a wrong record count (a replay "
        f"would show here): {_failures(fo.garbled)}. Gateway failovers (metrics, server: reason): "
        f"{_failures({k: int(v) for k, v in fo.failovers.items()})}.",
        "",
        "Requests per server during the run (metrics, by status): "
        + (
            "; ".join(
                f"{name}: " + ", ".join(f"{s}: {int(n)}" for s, n in sorted(per.items()))
                for name, per in sorted(fo.per_server.items())
            )
            or "-"
        )
        + ".",
        "",
    ]

    rows: list[tuple[str, str, str, bool | None]] = []
    for lo in loads:
        ratio = cost.ratio(lo.label)
        bad = (
            ratio is None
            or math.isnan(ratio)
            or any(cost.errors.get((lo.label, c), 0) for c in ("one", "two"))
        )
        rows.append(
            (
                f"gateway CPU per request, two servers / one: {lo.label}",
                f"{_f(ratio, 3)}x",
                f"<= {CPU_RATIO_MAX:g}x",
                None if bad else ratio <= CPU_RATIO_MAX,  # type: ignore[operator]
            )
        )
    rows.append(
        (
            "failover: requests lost (not started streaming, failed anyway)",
            str(fo.lost_total) if fo.ran else "-",
            f"{LOST_MAX}",
            None if not fo.ran else fo.lost_total <= LOST_MAX,
        )
    )
    rows.append(
        (
            "failover: answers replayed or mixed (wrong record count)",
            str(sum(fo.garbled.values())) if fo.ran else "-",
            "0",
            None if not fo.ran else not fo.garbled,
        )
    )
    lines += ["## Targets", "", "| target | measured | limit | result |", "|---|---:|---:|---|"]
    for name, m, lim, ok in rows:
        verdict = "n/a (not measured)" if ok is None else ("PASS" if ok else "FAIL")
        if same and name.startswith("gateway CPU"):
            verdict = "n/a (--same)"
        lines.append(f"| {name} | {m} | {lim} | {verdict} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter phases (about 1 minute)")
    size.add_argument("--smoke", action="store_true", help="tiny run that checks the harness")
    parser.add_argument(
        "--phases",
        default="cost,failover",
        help="comma-separated subset of cost, failover (default: both)",
    )
    parser.add_argument(
        "--same",
        action="store_true",
        help="A/A run: the cost phase's 'two' blocks use `upstream:` too (the harness' noise)",
    )
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if bad := args.phases - {"cost", "failover"}:
        parser.error(f"unknown phase(s): {', '.join(sorted(bad))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    workdir = Path(tempfile.mkdtemp(prefix="gateway-upstreams-"))
    text = run_bench(UpstreamsBench(args, plan, workdir), workdir, keep_workdir=args.keep_workdir)
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
