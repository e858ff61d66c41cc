"""Shared fixtures: the real gateway on a real socket, in front of the fake Ollama.

`gateway_factory(config_dict)` writes the dict as YAML, loads it through the real loader and
serves the real app on 127.0.0.1 with a free port, exactly as `serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import itertools
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.config_load import load_config
from gateway.http_server import GatewayRunner
from tests.fake_ollama import FakeOllama

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.redis_server"]  # redis_server / own_redis fixtures (a real redis-server)


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    runner: web.AppRunner
    config: GatewayConfig
    config_path: Path

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://").removeprefix("https://")


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    server = await FakeOllama().start()
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def gateway_factory(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    runners: list[web.AppRunner] = []

    async def start(
        config: dict[str, Any], *, ssl_context: Any = None, **deps: Any
    ) -> RunningGateway:
        config = {"listen": "127.0.0.1:0", **config}
        path = tmp_path / f"gateway-{len(runners)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        loaded = load_config(path)
        app = create_app(loaded, **deps)
        # The runner `serve` uses: aiohttp's parser errors are answered the gateway's way.
        runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        host, port = runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        return RunningGateway(f"{scheme}://{host}:{port}", app, runner, loaded, path)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


# An admin API key for tests that exercise the relay rather than authentication.
ADMIN_KEY = "ogw_relay-tests-admin-key-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}
ADMIN_KEY_ENTRY = {
    "name": "tester",
    "sha256": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
    "roles": ["admin"],
}


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    """A gateway in front of `fake` with one admin API key (`ADMIN_HEADERS`)."""
    return await gateway_factory(
        {"upstream": {"url": fake.url}, "auth": {"api_keys": [ADMIN_KEY_ENTRY]}}
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
async def admin_http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that sends `ADMIN_HEADERS` on every request."""
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, headers=ADMIN_HEADERS) as session:
        yield session


# --- processes: the CLI as a user runs it, and other programs -------------------------------

LISTENING = re.compile(r"ollama-gateway listening on (https?://\S+)")
_config_files = itertools.count()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a gateway process: ours, minus anything that would steer it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA", "GATEWAY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def free_port() -> int:
    """A loopback port nothing listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(condition: Callable[[], Any], within: float = 5.0, interval: float = 0.005) -> Any:
    """Poll a condition that another task or process makes true (bounded; not a fixed sleep).

    `condition` may return an awaitable; the first truthy value is returned.
    """
    async with asyncio.timeout(within):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(interval)


async def run_command(
    *argv: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    wait_s: float = 30.0,
) -> tuple[int, str, str]:
    """Run a program to completion -> (exit code, stdout, stderr); killed if it overruns."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), wait_s)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, wait_s: float = 30.0
) -> tuple[int, str, str]:
    """`python -m gateway ARGS` to completion -> (exit code, stdout, stderr)."""
    return await run_command(
        sys.executable, "-m", "gateway", *args, env=env or cli_env(), stdin=stdin, wait_s=wait_s
    )


@dataclass
class GatewayProcess:
    """`python -m gateway serve` as a user runs it, in a subprocess.

    Its stdout and stderr are read line by line as they come (a chatty log never fills a
    pipe), so a test can await a log line, send a signal, and check the exit code.
    """

    process: asyncio.subprocess.Process
    config_path: Path
    url: str = ""
    lines: list[str] = field(default_factory=list)  # stdout and stderr, in arrival order
    stderr_lines: list[str] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def host_port(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stderr_text(self) -> str:
        """What the gateway logged so far."""
        return "".join(line + "\n" for line in self.stderr_lines)

    def vm_status(self, name: str) -> int:
        """A /proc/PID/status memory field (VmRSS, VmHWM) in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(name)

    async def _read(self, stream: asyncio.StreamReader, also: list[str] | None = None) -> None:
        while raw := await stream.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if also is not None:
                also.append(line)
            self._changed.set()
        self._changed.set()

    async def wait_line(self, pattern: str, *, after: int = 0, wait_s: float = 10.0) -> str:
        """The first output line from index `after` on matching `pattern` (a regex)."""
        regex = re.compile(pattern)
        seen = after

        async def scan() -> str:
            nonlocal seen
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if regex.search(line):
                        return line
                if all(reader.done() for reader in self._readers):
                    raise AssertionError(f"gateway exited before {pattern!r}:\n{self.output}")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(scan(), wait_s)
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output}") from None

    def send(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def reload(self, expect: str = r"config reloaded from .* \(generation \d+\)") -> str:
        """SIGHUP, then the first line logged after it that matches `expect`."""
        mark = len(self.lines)
        self.send(signal.SIGHUP)
        return await self.wait_line(expect, after=mark)

    async def wait_exit(self, wait_s: float = 10.0) -> int:
        """The exit code, once the process ended and all its output was read."""
        code = await asyncio.wait_for(self.process.wait(), wait_s)
        await asyncio.wait_for(asyncio.gather(*self._readers), wait_s)
        return code

    async def stop(self, wait_s: float = 10.0) -> int:
        """A graceful stop (SIGTERM, as systemd and docker do) -> the exit code."""
        if self.process.returncode is None:
            self.send(signal.SIGTERM)
        return await self.wait_exit(wait_s)

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        if self._readers:  # EOF follows the exit; never wait on it for long
            await asyncio.wait(self._readers, timeout=2)
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@contextlib.asynccontextmanager
async def gateway_process(
    config: dict[str, Any] | Path,
    tmp_path: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
    start_s: float = 30.0,
) -> AsyncIterator[GatewayProcess]:
    """`python -m gateway serve --config CONFIG EXTRA_ARGS`; yields once it printed its address.

    `config` is a dict (written as YAML, `listen: 127.0.0.1:0` unless given) or a file path
    (relative ones are relative to the repository). `env` is added to `cli_env()`. The
    process is always killed afterwards; a test that cares how it ends awaits `stop()`.
    """
    if isinstance(config, Path):
        path = config
    else:
        path = tmp_path / f"gateway-process-{next(_config_files)}.yaml"
        path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", **config}, sort_keys=False))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(path),
        *extra_args,
        cwd=REPO,
        env=cli_env(**(env or {})),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,  # a long JSON log line is still one line
    )
    gw = GatewayProcess(process, path)
    assert process.stdout is not None and process.stderr is not None
    gw._readers = [
        asyncio.create_task(gw._read(process.stdout)),
        asyncio.create_task(gw._read(process.stderr, gw.stderr_lines)),
    ]
    try:
        match = LISTENING.search(await gw.wait_line(LISTENING.pattern, wait_s=start_s))
        assert match
        gw.url = match.group(1)
        yield gw
    finally:
        await gw.kill()


def require_binary(name: str) -> str:
    """Path of a system binary; under CI=true its absence fails the run instead of skipping."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is required under CI=true (.ci/run installs it)")
    pytest.skip(f"{name} not installed")
