"""Markdown tables and PASS/FAIL verdicts from one bench run's measurements."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.load import IdleResult, RpsResult, StreamResult, percentile

MIB = 1024 * 1024

# The targets (issue 2 point 9): limits are ratios to nginx or direct measured in the same run.
TAGS_CONNS = 32
APR1_MIN_RATIO = 0.6
BCRYPT_MIN_RATIO = 5.0
STREAMS_FOR_TARGET = 64
ADDED_P50_MAX_MS = 1.5
P99_MAX_RATIO = 2.0
CPU_MAX_RATIO = 2.5
IDLE_STREAMS_FOR_TARGET = 2000
IDLE_RSS_MAX_MIB = 150.0

STREAMS_LEGEND = (
    "Chunk latency = receive time - the upstream's send stamp (CLOCK_MONOTONIC), per record; "
    "TTFC from connect to the first record; added = chunk p50 - direct's chunk p50 at the "
    "same concurrency; CPU = the proxy process(es)' CPU time (all threads) during the run."
)


@dataclass
class Results:
    title: str
    notes: list[str]
    targets: list[str]  # in table order: direct, nginx, gateway/<loop>...
    auth: bool
    chunks: int
    delay_ms: float
    rps: dict[tuple[str, str, int], RpsResult] = field(default_factory=dict)
    streams: dict[tuple[str, int], StreamResult] = field(default_factory=dict)
    idle: dict[str, tuple[int, IdleResult]] = field(default_factory=dict)  # rss before, result

    @property
    def gateways(self) -> list[str]:
        return [t for t in self.targets if t.startswith("gateway")]


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _errors(r: RpsResult) -> str:
    parts = []
    if r.non_2xx:
        parts.append(f"{r.non_2xx} non-2xx")
    if r.socket_errors:
        parts.append(f"{r.socket_errors} socket")
    return ", ".join(parts) or "0"


def rps_table(res: Results) -> list[str]:
    lines = [
        "| conns | target | credentials | req/s | p50 ms | p99 ms | req/s vs nginx | errors |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for (target, cred, conns), r in res.rps.items():
        nginx = res.rps.get(("nginx", cred, conns))
        vs = _ratio(r.rps, nginx.rps) if nginx and nginx.valid and r.valid else None
        lines.append(
            f"| {conns} | {target} | {cred} | {_f(r.rps, 0) if r.valid else 'invalid'} | "
            f"{_f(r.p50_ms)} | {_f(r.p99_ms)} | {_f(vs) + 'x' if vs else '-'} | {_errors(r)} |"
        )
    return lines


def _direct_p50(res: Results, n: int) -> float | None:
    direct = res.streams.get(("direct", n))
    return direct.chunk_ms(50) if direct and direct.records else None


def streams_table(res: Results) -> list[str]:
    lines = [
        "| streams | target | completed | TTFC p50 ms | TTFC p99 ms | chunk p50 ms | chunk p99 ms "
        "| added p50 ms | CPU s / 1000 chunks | CPU vs nginx |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (target, n), r in res.streams.items():
        direct_p50 = _direct_p50(res, n)
        added = None if target == "direct" or direct_p50 is None else r.chunk_ms(50) - direct_p50
        cpu = None if target == "direct" else r.cpu_per_1000
        nginx = res.streams.get(("nginx", n))
        cpu_vs = _ratio(cpu, nginx.cpu_per_1000) if nginx and target != "nginx" else None
        failed = f" ({', '.join(f'{k}: {v}' for k, v in r.failures.items())})" if r.failures else ""
        lines.append(
            f"| {n} | {target} | {r.completed}/{r.streams}{failed} | "
            f"{_f(percentile(r.ttfc_ms, 50))} | {_f(percentile(r.ttfc_ms, 99))} | "
            f"{_f(r.chunk_ms(50), 3)} | {_f(r.chunk_ms(99), 3)} | {_f(added, 3)} | "
            f"{_f(cpu, 3)} | {_f(cpu_vs) + 'x' if cpu_vs else '-'} |"
        )
    return lines


def idle_table(res: Results) -> list[str]:
    lines = [
        "| target | streams open | RSS before MiB | RSS with streams open MiB | KiB per stream |",
        "|---|---:|---:|---:|---:|",
    ]
    for target, (before, r) in res.idle.items():
        after = int(r.measured)
        per = (after - before) / 1024 / r.established if r.established else None
        lines.append(
            f"| {target} | {r.established}/{r.wanted} | {_f(before / MIB, 1)} | "
            f"{_f(after / MIB, 1)} | {_f(per, 1)} |"
        )
    return lines


@dataclass
class Verdict:
    name: str
    gateway: str
    measured: str
    limit: str
    result: str


def _verdict(ok: bool | None, why: str = "not measured") -> str:
    return f"n/a ({why})" if ok is None else ("PASS" if ok else "FAIL")


def verdicts(res: Results) -> list[Verdict]:
    out: list[Verdict] = []
    for gw in res.gateways:
        for cred, limit in (("apr1", APR1_MIN_RATIO), ("bcrypt", BCRYPT_MIN_RATIO)):
            used = cred if res.auth else "none"
            mine = res.rps.get((gw, used, TAGS_CONNS))
            nginx = res.rps.get(("nginx", used, TAGS_CONNS))
            both = mine and nginx and mine.valid and nginx.valid
            ratio = _ratio(mine.rps, nginx.rps) if both and mine and nginx else None
            why = "not measured"
            if mine and not mine.valid:
                why = f"gateway answered {_errors(mine)}"
            ok = None if ratio is None else ratio >= limit
            if not res.auth:
                ok, why = None, "--no-auth: relay only" if cred == "apr1" else "--no-auth"
            out.append(
                Verdict(
                    f"GET /api/tags @{TAGS_CONNS} conns, {cred} user: req/s vs nginx",
                    gw,
                    _f(ratio) + "x" if ratio else "-",
                    f">= {limit}x",
                    _verdict(ok, why),
                )
            )
        mine_s = res.streams.get((gw, STREAMS_FOR_TARGET))
        nginx_s = res.streams.get(("nginx", STREAMS_FOR_TARGET))
        direct_p50 = _direct_p50(res, STREAMS_FOR_TARGET)
        added = mine_s.chunk_ms(50) - direct_p50 if mine_s and direct_p50 is not None else None
        out.append(
            Verdict(
                f"{STREAMS_FOR_TARGET} streams: median latency added per chunk",
                gw,
                f"{_f(added, 3)} ms",
                f"<= {ADDED_P50_MAX_MS} ms",
                _verdict(None if added is None else added <= ADDED_P50_MAX_MS),
            )
        )
        p99 = _ratio(mine_s.chunk_ms(99), nginx_s.chunk_ms(99)) if mine_s and nginx_s else None
        out.append(
            Verdict(
                f"{STREAMS_FOR_TARGET} streams: p99 chunk latency vs nginx",
                gw,
                f"{_f(p99)}x ({_f(mine_s.chunk_ms(99) if mine_s else None, 3)} ms)",
                f"<= {P99_MAX_RATIO}x",
                _verdict(None if p99 is None else p99 <= P99_MAX_RATIO),
            )
        )
        cpu = _ratio(mine_s.cpu_per_1000, nginx_s.cpu_per_1000) if mine_s and nginx_s else None
        out.append(
            Verdict(
                f"{STREAMS_FOR_TARGET} streams: CPU s per 1000 chunks vs nginx",
                gw,
                f"{_f(cpu)}x ({_f(mine_s.cpu_per_1000 if mine_s else None, 3)} s)",
                f"<= {CPU_MAX_RATIO}x",
                _verdict(None if cpu is None else cpu <= CPU_MAX_RATIO),
            )
        )
        idle = res.idle.get(gw)
        full = idle is not None and idle[1].established >= IDLE_STREAMS_FOR_TARGET
        rss = int(idle[1].measured) / MIB if idle else None
        out.append(
            Verdict(
                f"{IDLE_STREAMS_FOR_TARGET} idle streams: gateway RSS",
                gw,
                f"{_f(rss, 1)} MiB"
                + (f" at {idle[1].established} streams" if idle and not full else ""),
                f"<= {IDLE_RSS_MAX_MIB:.0f} MiB",
                _verdict(
                    rss <= IDLE_RSS_MAX_MIB if full and rss else None,
                    "fewer streams open" if idle else "not measured",
                ),
            )
        )
    return out


def render(res: Results, *, rps_note: str, idle_n: int) -> str:
    lines = [f"# {res.title}", ""] + [f"- {note}" for note in res.notes] + [""]
    if res.rps:
        lines += [f"## GET /api/tags ({rps_note})", ""] + rps_table(res) + [""]
    if res.streams:
        heading = f"## Streams: POST /api/chat, {res.chunks} NDJSON records"
        lines += [f"{heading} {res.delay_ms:g} ms apart", "", STREAMS_LEGEND, ""]
        lines += streams_table(res) + [""]
    if res.idle:
        lines += [f"## {idle_n} idle streams (upstream sends one record, then holds)", ""]
        lines += idle_table(res) + [""]
    lines += [
        "## Targets",
        "",
        "| target | gateway | measured | limit | result |",
        "|---|---|---:|---:|---|",
    ]
    lines += [
        f"| {v.name} | {v.gateway} | {v.measured} | {v.limit} | {v.result} |" for v in verdicts(res)
    ]
    return "\n".join(lines) + "\n"
