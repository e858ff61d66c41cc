"""Gateway vs nginx vs direct, in one run: request rate, stream latency, CPU, idle memory.

    .venv/bin/python bench/run.py [--quick | --smoke] [--no-auth] [--out bench/results/x.md]

Starts a fast fake upstream (bench/fast_upstream.py), nginx (1 worker, proxy_buffering off,
auth_basic on the same htpasswd file) and the gateway (`python -m gateway serve`, once on
uvloop and once on plain asyncio), all on 127.0.0.1, then measures them in turn and prints
one markdown report with PASS/FAIL per target. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bcrypt  # noqa: E402
from passlib.hash import apr_md5_crypt  # type: ignore[import-untyped]  # noqa: E402

from bench import load, procs, report  # noqa: E402
from bench.procs import Service, emit, run_bench  # noqa: E402

BCRYPT_ROUNDS = 12  # the default of passlib and htpasswd -B: what users have
IDLE_HOLD_SECONDS = 120.0  # upstream silence per idle stream; the clients leave long before
# nginx checks bcrypt inside its event loop: one epoll round verifies every waiting request
# (32 x ~0.25 s) before any answer goes out, so its cell must span several such rounds.
NGINX_BCRYPT_SECONDS = 20.0


@dataclass(frozen=True)
class Plan:
    mode: str
    conns: tuple[int, ...]
    stream_levels: tuple[int, ...]
    wrk_seconds: float
    warm_seconds: float
    stream_repeats: int
    rps_rounds: int  # each cell measured this often, interleaved; the median round is kept
    idle_streams: int
    python_requests: int  # per cell, when the python load client is used


PLANS = {
    "full": Plan("full", (1, 32, 256), (1, 64, 512), 5, 1, 3, 3, 2000, 20_000),
    "quick": Plan("quick", (1, 32, 256), (1, 64, 512), 3, 1, 1, 1, 2000, 5_000),
    "smoke": Plan("smoke", (1,), (1,), 1, 0, 1, 1, 20, 20),
}


@dataclass
class Target:
    name: str
    service: Service
    proxy: bool  # False for the direct connection to the upstream


@dataclass
class Creds:
    apr1: str | None
    bcrypt: str | None

    def header(self, label: str) -> str | None:
        return {"apr1": self.apr1, "bcrypt": self.bcrypt}.get(label)


def write_htpasswd(path: Path) -> Creds:
    apr1_pw, bcrypt_pw = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    bcrypt_hash = bcrypt.hashpw(bcrypt_pw.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()
    path.write_text(f"bench-apr1:{apr_md5_crypt.hash(apr1_pw)}\nbench-bcrypt:{bcrypt_hash}\n")
    return Creds(load.basic("bench-apr1", apr1_pw), load.basic("bench-bcrypt", bcrypt_pw))


async def settle(service: Service, quiet: float = 0.02, limit: float = 20.0) -> None:
    """Wait until a proxy stops burning CPU (e.g. nginx finishing queued bcrypt checks)."""
    deadline = time.monotonic() + limit
    last = service.cpu_seconds()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = service.cpu_seconds()
        if now - last <= quiet:
            return
        last = now


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, workdir: Path) -> None:
        self.args, self.plan, self.workdir = args, plan, workdir
        self.cpus = procs.Cpus.plan(not args.no_pin)
        self.targets: list[Target] = []
        self.creds = Creds(None, None)
        self.wrk = None if args.load_client == "python" else procs.find_binary("wrk")
        self.notes: list[str] = []
        self.nofile = procs.raise_nofile()  # 2,000 streams need ~4,000 sockets per proxy
        self.t0 = time.monotonic()

    # ------------------------------------------------------------ setup

    def start(self) -> None:
        if self.cpus.load is not None:
            os.sched_setaffinity(0, self.cpus.load)  # children inherit: upstream, wrk
        upstream = procs.start_upstream(
            self.workdir, self.cpus.load, chunks=self.args.chunks, delay_ms=self.args.chunk_delay_ms
        )
        self.targets.append(Target("direct", upstream, proxy=False))
        htpasswd = None
        if not self.args.no_auth:
            htpasswd = self.workdir / "htpasswd"
            self.creds = write_htpasswd(htpasswd)
        nginx = None if self.args.no_nginx else procs.find_binary("nginx")
        if nginx:
            self.targets.append(
                Target(
                    "nginx",
                    procs.start_nginx(
                        nginx,
                        self.workdir,
                        self.cpus.proxy,
                        upstream_port=upstream.port,
                        htpasswd=htpasswd,
                    ),
                    proxy=True,
                )
            )
        else:
            self.notes.append("nginx not found or disabled: no nginx comparison")
        for loop_name in self.args.loops:
            name = f"gateway/{loop_name}"
            service = procs.start_gateway(
                self.workdir,
                self.cpus.proxy,
                name=name,
                loop=loop_name,
                upstream_port=upstream.port,
                htpasswd=htpasswd,
            )
            actual = procs.loop_in_use(service.popen.pid)
            self.notes.append(f"{name}: pid {service.popen.pid}, event loop in use: {actual}")
            self.targets.append(Target(name, service, proxy=True))

    def stop(self) -> None:
        for target in reversed(self.targets):
            target.service.stop()

    def cred_for(self, target: Target) -> str:
        return "apr1" if target.proxy and not self.args.no_auth else "none"

    # ------------------------------------------------------------ phases

    async def rps_cell(self, target: Target, conns: int, cred: str) -> load.RpsResult:
        auth = self.creds.header(cred)
        port = target.service.port
        if self.wrk is None:
            return await load.run_python_rps(
                "127.0.0.1",
                port,
                "/api/tags",
                conns,
                requests=self.plan.python_requests,
                seconds=self.plan.wrk_seconds + 10,
                auth=auth,
            )
        url = f"http://127.0.0.1:{port}/api/tags"
        # One request first: the gateway caches a verified password, nginx never does.
        await load.run_python_rps(
            "127.0.0.1", port, "/api/tags", 1, requests=1, seconds=30, auth=auth
        )
        if self.plan.warm_seconds and cred != "bcrypt":
            await load.run_wrk(self.wrk, url, conns, self.plan.warm_seconds, auth)
        seconds = self.plan.wrk_seconds
        if cred == "bcrypt" and target.name == "nginx":
            seconds = max(seconds, NGINX_BCRYPT_SECONDS)
        result = await load.run_wrk(self.wrk, url, conns, seconds, auth)
        if target.proxy:
            await settle(target.service)
        return result

    async def phase_rps(self, res: report.Results) -> None:
        cells: list[tuple[Target, str, int]] = [
            (target, self.cred_for(target), conns)
            for conns in self.plan.conns
            for target in self.targets
        ]
        if not self.args.no_auth and report.TAGS_CONNS in self.plan.conns:
            cells += [
                (target, "bcrypt", report.TAGS_CONNS)
                for target in sorted(
                    (t for t in self.targets if t.proxy), key=lambda t: t.name == "nginx"
                )
            ]  # nginx lingers
        # Rounds interleave every target at one level, so a noisy moment hits them all alike.
        groups: dict[tuple[bool, int], list[tuple[Target, str, int]]] = {}
        for cell in cells:
            groups.setdefault((cell[1] == "bcrypt", cell[2]), []).append(cell)
        for (is_bcrypt, _conns), group in groups.items():
            runs: dict[tuple[str, str, int], list[load.RpsResult]] = {}
            # bcrypt: one round; the ratio is in the hundreds, and nginx's cell is long.
            for _ in range(1 if is_bcrypt else self.plan.rps_rounds):
                for target, cred, conns in group:
                    self.progress(f"tags {target.name} c={conns} {cred}")
                    runs.setdefault((target.name, cred, conns), []).append(
                        await self.rps_cell(target, conns, cred)
                    )
            for key, results in runs.items():
                results.sort(key=lambda r: (r.valid, r.rps))
                res.rps[key] = results[len(results) // 2]

    async def phase_streams(self, res: report.Results) -> None:
        limit = self.args.chunks * self.args.chunk_delay_ms / 1000 + 30
        for n in self.plan.stream_levels:
            for _ in range(self.plan.stream_repeats):
                for target in self.targets:
                    self.progress(f"streams {target.name} n={n}")
                    cpu_before = target.service.cpu_seconds()
                    result = await load.run_streams(
                        "127.0.0.1",
                        target.service.port,
                        n,
                        chunks=self.args.chunks,
                        delay_ms=self.args.chunk_delay_ms,
                        auth=self.creds.header(self.cred_for(target)),
                        time_limit=limit,
                    )
                    result.cpu_seconds = target.service.cpu_seconds() - cpu_before
                    key = (target.name, n)
                    if key in res.streams:
                        res.streams[key].merge(result)
                    else:
                        res.streams[key] = result
                    if target.proxy:
                        await settle(target.service)

    async def phase_idle(self, res: report.Results) -> None:
        for target in (t for t in self.targets if t.proxy):
            self.progress(f"idle {target.name} n={self.plan.idle_streams}")
            service = target.service
            before = service.rss_bytes()

            async def measure(service: Service = service) -> int:
                await asyncio.sleep(0.5)  # let the last connections settle into their buffers
                return service.rss_bytes()

            result = await load.hold_streams(
                "127.0.0.1",
                service.port,
                self.plan.idle_streams,
                auth=self.creds.header(self.cred_for(target)),
                hold=IDLE_HOLD_SECONDS,
                measure=measure,
                time_limit=60.0,
            )
            res.idle[target.name] = (before, result)
            await settle(service, limit=15.0)

    def progress(self, what: str) -> None:
        if not self.args.silent:
            print(f"[bench {time.monotonic() - self.t0:6.1f}s] {what}", file=sys.stderr, flush=True)

    async def run(self) -> report.Results:
        self.t0 = time.monotonic()
        res = report.Results(
            title=f"ollama-gateway bench ({self.plan.mode}, "
            f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')})",
            notes=[],
            targets=[t.name for t in self.targets],
            auth=not self.args.no_auth,
            chunks=self.args.chunks,
            delay_ms=self.args.chunk_delay_ms,
        )
        await self.phase_rps(res)
        await self.phase_streams(res)
        if self.plan.idle_streams:
            await self.phase_idle(res)
        elapsed = time.monotonic() - self.t0
        res.notes = [
            f"command: `{shlex.join([sys.executable, *sys.argv])}`",
            f"machine: {os.cpu_count()} CPUs; {self.cpus.describe()}; "
            f"RLIMIT_NOFILE {self.nofile}; measured in {elapsed:.0f} s",
            "credentials: "
            + (
                "none (--no-auth: gateway routes public, nginx without auth_basic)"
                if self.args.no_auth
                else f"Basic, one htpasswd file for nginx and the gateway "
                f"(apr1 user; bcrypt user with {BCRYPT_ROUNDS} rounds)"
            ),
            "gateway config: "
            + ("public routes" if self.args.no_auth else "htpasswd auth, route table")
            + ", role limits (never hit), metrics on, JSON access log to a file; nginx: 1 worker, "
            "proxy_buffering off, upstream keepalive, access log on",
            *self.notes,
        ]
        return res


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter cells (< 3 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny run that checks the harness")
    parser.add_argument("--no-auth", action="store_true", help="no credentials anywhere")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--loops",
        default="uvloop,asyncio",
        help="gateway event loops to run (comma-separated: uvloop, asyncio)",
    )
    parser.add_argument("--chunks", type=int, default=50, help="records per stream")
    parser.add_argument(
        "--chunk-delay-ms", type=float, default=20.0, help="upstream pause between records"
    )
    parser.add_argument("--idle-streams", type=int, help="override the idle stream count")
    parser.add_argument(
        "--load-client",
        choices=("wrk", "python"),
        help="request-rate client (default: wrk if installed; python in --smoke)",
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx comparison")
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    parser.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    if bad := set(args.loops) - {"uvloop", "asyncio"}:
        parser.error(f"unknown loop(s): {', '.join(sorted(bad))}")
    if args.load_client is None and args.smoke:
        args.load_client = "python"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.idle_streams is not None:
        plan = Plan(**{**plan.__dict__, "idle_streams": args.idle_streams})
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    bench = Bench(args, plan, workdir)
    results = run_bench(bench, workdir, keep_workdir=args.keep_workdir)
    text = report.render(
        results,
        idle_n=plan.idle_streams,
        rps_note=(
            f"wrk, 1 thread, {plan.wrk_seconds:g} s per cell after {plan.warm_seconds:g} s warm-up"
            if bench.wrk
            else f"python client, up to {plan.python_requests} requests per cell"
        ),
    )
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
