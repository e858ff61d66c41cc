"""Shared fixtures: the real gateway on a real socket, in front of the fake Ollama.

`gateway_factory(config_dict)` writes the dict as YAML, loads it through the real loader and
serves the real app on 127.0.0.1 with a free port, exactly as `serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.config_load import load_config
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
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5)
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


@dataclass
class GatewayProcess:
    """`python -m gateway serve` as a user runs it, in a subprocess."""

    url: str
    process: asyncio.subprocess.Process
    config_path: Path
    stderr_path: Path

    def stderr_text(self) -> str:
        """What the gateway logged so far (stderr goes to a file so it can never block)."""
        return self.stderr_path.read_text(errors="replace")

    def vm_status(self, field: str) -> int:
        """A /proc/PID/status memory field (VmRSS, VmHWM) in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)


@contextlib.asynccontextmanager
async def gateway_process(
    config: dict[str, Any] | Path,
    tmp_path: Path,
    *extra_args: str,
    env: dict[str, str] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """Start the CLI, wait for its "listening on" line, always kill it afterwards."""
    if isinstance(config, Path):
        path = config
    else:
        path = tmp_path / "gateway-process.yaml"
        path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", **config}, sort_keys=False))
    stderr_path = tmp_path / f"gateway-{time.monotonic_ns()}.stderr"
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(path),
            *extra_args,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        if "listening on" not in line:
            await process.wait()
            raise AssertionError(f"gateway did not start: {line!r} {stderr_path.read_text()!r}")
        yield GatewayProcess(line.rsplit(" ", 1)[1].strip(), process, path, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


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
