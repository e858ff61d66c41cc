"""The processes under test: fast upstream, gateway(s), nginx; CPU and memory from /proc.

CPU pinning (when the machine has at least 2 CPUs): the bench itself, its load generators
(wrk, the stream clients) and the fast upstream run on the first CPU; the proxy under test
(each gateway, nginx's master and single worker) on the second. A proxy is only ever loaded
while the others idle, so each gets a whole core and the load generator never steals it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
NOFILE_WANTED = 65536  # 2,000 client + 2,000 upstream sockets per proxy, with headroom
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE for this process; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(NOFILE_WANTED, hard)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Cpus:
    load: set[int] | None  # bench, load generators, upstream
    proxy: set[int] | None  # the proxy under test

    @classmethod
    def plan(cls, enabled: bool) -> Cpus:
        available = sorted(os.sched_getaffinity(0))
        if not enabled or len(available) < 2:
            return cls(None, None)
        return cls({available[0]}, {available[1]})

    def describe(self) -> str:
        if self.load is None:
            return "no CPU pinning"
        return (
            f"load generators + upstream on CPU {sorted(self.load)}, "
            f"proxy under test on CPU {sorted(self.proxy or ())}"
        )


def _preexec(cpus: set[int] | None) -> Callable[[], None]:
    def setup() -> None:
        os.setsid()  # own process group: stopped as a group, never by name
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of all threads: nanosecond schedstat when the kernel has it (a 1 s run of a
    lightly loaded nginx is only a few 10 ms ticks), else utime+stime from /proc/PID/stat."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime (all threads)


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


@dataclass
class Service:
    """A started server process (its process group is stopped on `stop`)."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    extra_pids: list[int] = field(default_factory=list)  # e.g. nginx's worker

    @property
    def pids(self) -> list[int]:
        return [self.popen.pid, *self.extra_pids]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids)

    def rss_bytes(self) -> int:
        return sum(proc_rss_bytes(pid) for pid in self.pids)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)


def _spawn(
    name: str,
    argv: list[str],
    workdir: Path,
    cpus: set[int] | None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / f"{name.replace('/', '-')}.log"
    with open(log, "wb") as out:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env,
            preexec_fn=_preexec(cpus),
        )
    return popen, log


def _wait_ready(
    name: str,
    popen: subprocess.Popen[bytes],
    log: Path,
    port: int,
    marker: str | None,
    deadline_s: float = 20.0,
) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited ({popen.returncode}):\n{log.read_text()[-2000:]}")
        if marker is None or marker in log.read_text(errors="replace"):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {deadline_s}s:\n{log.read_text()[-2000:]}")


def start_upstream(
    workdir: Path,
    cpus: set[int] | None,
    *,
    chunks: int,
    delay_ms: float,
    parallel: int = 0,
    name: str = "upstream",
) -> Service:
    """The fast upstream; `parallel` > 0 gives it Ollama's per-model slots (FIFO queue).
    `name` (its log file) tells several upstreams apart."""
    port = free_port()
    argv = [
        sys.executable,
        str(REPO / "bench" / "fast_upstream.py"),
        "--port",
        str(port),
        "--chunks",
        str(chunks),
        "--chunk-delay",
        str(delay_ms / 1000),
    ]
    if parallel:
        argv += ["--parallel", str(parallel)]
    popen, log = _spawn(name, argv, workdir, cpus)
    _wait_ready(f"fast {name}", popen, log, port, "listening on")
    return Service(name, popen, port, log)


# ---------------------------------------------------------------- gateway


def gateway_config(port: int, upstream_port: int, htpasswd: Path | None) -> dict[str, Any]:
    """The full pipeline: Basic users from an htpasswd file, a route table, role limits high
    enough never to trigger (but evaluated on every request), metrics, JSON access log."""
    if htpasswd is not None:
        access: dict[str, Any] = {"roles": ["user"]}
        auth: dict[str, Any] = {"htpasswd": str(htpasswd), "htpasswd_roles": ["user"]}
    else:
        access, auth = {"public": True}, {}
    return {
        "listen": f"127.0.0.1:{port}",
        # The relay's cost against nginx: the fast upstream has no slot limit, so no queue.
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "slots": 0},
        "auth": auth,
        "roles": {
            "user": {
                "models": ["*"],
                "limits": {
                    "requests_per_minute": 100_000_000,
                    "concurrency": 1_000_000,
                    "tokens_per_minute": 10**12,
                    "tokens_per_day": 10**14,
                },
            },
            "admin": {"models": ["*"]},
        },
        "routes": [
            {"path": "/api/version", "methods": ["GET"], "public": True},
            {"path": "/api/tags", "methods": ["GET", "HEAD"], **access},
            {"path": "/api/chat", "methods": ["POST"], **access},
        ],
        "logging": {"level": "info", "format": "json", "access_log": True},
        "metrics": {"enabled": True, "path": "/metrics", "roles": ["admin"]},
    }


def start_gateway(
    workdir: Path,
    cpus: set[int] | None,
    *,
    name: str,
    loop: str,
    upstream_port: int,
    htpasswd: Path | None,
    config_for: Callable[[int], dict[str, Any]] | None = None,
) -> Service:
    """`python -m gateway serve` as users run it. `loop="asyncio"` hides uvloop from the
    process (a `uvloop` module that fails to import, first on PYTHONPATH), so `run()` takes its
    asyncio fallback; OLLAMA_GATEWAY_LOOP=asyncio is set too for a server that reads it.
    `config_for(port)` replaces the default `gateway_config` (other benchmarks' setups)."""
    port = free_port()
    config = workdir / f"{name.replace('/', '-')}.yaml"
    settings = (
        config_for(port)
        if config_for is not None
        else gateway_config(port, upstream_port, htpasswd)
    )
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["OLLAMA_GATEWAY_LOOP"] = loop
    if loop == "asyncio":
        shadow = workdir / "no-uvloop"
        shadow.mkdir(exist_ok=True)
        (shadow / "uvloop.py").write_text('raise ImportError("uvloop hidden by bench/run.py")\n')
        env["PYTHONPATH"] = str(shadow)
    argv = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
    ]
    popen, log = _spawn(name, argv, workdir, cpus, env)
    _wait_ready(name, popen, log, port, "listening on")
    return Service(name, popen, port, log)


def loop_in_use(pid: int) -> str:
    """Which event loop a process really runs: uvloop's extension is mapped when imported."""
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" if "uvloop" in f.read() else "asyncio"


# ---------------------------------------------------------------- nginx


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections 16384; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    upstream ollama {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{auth}        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(
    nginx: str, workdir: Path, cpus: set[int] | None, *, upstream_port: int, htpasswd: Path | None
) -> Service:
    port = free_port()
    user = ""
    if os.geteuid() == 0:  # root: workers drop to nobody, who must read the htpasswd file
        group = "nogroup"
        with contextlib.suppress(KeyError):
            grp.getgrnam("nobody")
            group = "nobody"
        user = f"user nobody {group};\n"
        os.chmod(workdir, 0o755)
    auth = ""
    if htpasswd is not None:
        os.chmod(htpasswd, 0o644)
        auth = f'        auth_basic "ollama-gateway";\n        auth_basic_user_file {htpasswd};\n'
    conf = workdir / "nginx.conf"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # a worker may not go beyond it
    conf.write_text(
        NGINX_CONF.format(
            user=user, dir=workdir, nofile=nofile, upstream_port=upstream_port, port=port, auth=auth
        )
    )
    popen, log = _spawn(
        "nginx",
        [nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "nginx-error.log")],
        workdir,
        cpus,
    )
    _wait_ready("nginx", popen, log, port, None)
    deadline = time.monotonic() + 5
    workers: list[int] = []
    while not workers and time.monotonic() < deadline:
        workers = child_pids(popen.pid)
        time.sleep(0.05)
    if not workers:
        raise RuntimeError("nginx started no worker")
    return Service("nginx", popen, port, log, extra_pids=workers)


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )


T = TypeVar("T", covariant=True)


class Runnable(Protocol[T]):
    """A benchmark: starts its processes, runs its measurements, stops its processes."""

    def start(self) -> None: ...
    def run(self) -> Coroutine[Any, Any, T]: ...
    def stop(self) -> None: ...


def run_bench(bench: Runnable[T], workdir: Path, *, keep_workdir: bool) -> T:
    """Start `bench`, run it on uvloop when installed (the gateway's own loop), always stop
    its processes, and remove `workdir` unless asked to keep it."""
    try:
        bench.start()
        try:
            import uvloop
        except ImportError:
            return asyncio.run(bench.run())
        return uvloop.run(bench.run())
    finally:
        bench.stop()
        if keep_workdir:
            print(f"workdir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def emit(text: str, out: Path | None) -> None:
    """Print a report, and write it to `out` when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
