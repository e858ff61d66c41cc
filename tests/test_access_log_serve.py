"""`ollama-gateway serve` as users run it: access lines on stderr, JSON or text, per `logging`."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.fake_ollama import FakeOllama
from tests.metrics_support import Scrape


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    def __init__(self, url: str) -> None:
        self.url = url
        self.stderr = ""


@asynccontextmanager
async def serve(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[Served]:
    """Run the real CLI; on exit SIGTERM it and collect its stderr (the log)."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"listen": "127.0.0.1:0", **config}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr_task = asyncio.create_task(proc.stderr.read())
    try:
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        assert "listening on" in line, line + (await stderr_task).decode()
        served = Served(line.split("listening on ", 1)[1].strip())
        yield served
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            await proc.wait()
            served_stderr = (await stderr_task).decode()
    assert proc.returncode == 0, served_stderr
    served.stderr = served_stderr


async def test_json_access_lines_on_stderr(
    tmp_path: Path, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    config = {"upstream": {"url": fake.url}, "logging": {"level": "info", "format": "json"}}
    prompt = {"model": "llama3.2", "prompt": "PROMPT-XYZ"}
    async with (
        serve(tmp_path, config) as gw,
        http.post(gw.url + "/api/generate", json=prompt) as response,
    ):
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
        await response.read()
    lines = [json.loads(line) for line in gw.stderr.splitlines() if line.strip()]
    access = [line for line in lines if line.get("log") == "access"]
    assert len(access) == 1
    assert access[0]["request_id"] == request_id
    assert access[0]["path"] == "/api/generate" and access[0]["status"] == 200
    events = [line for line in lines if line.get("log") != "access"]
    assert events and all({"time", "level", "logger", "message"} <= set(e) for e in events)
    assert "PROMPT-XYZ" not in gw.stderr


async def test_text_format_level_and_separate_metrics_listener(
    tmp_path: Path, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    metrics_listen = f"127.0.0.1:{free_port()}"
    config = {
        "upstream": {"url": fake.url},
        "logging": {"level": "warning", "format": "text"},
        "metrics": {"public": True, "listen": metrics_listen},
    }
    async with serve(tmp_path, config) as gw:
        async with http.get(gw.url + "/api/version") as response:
            assert response.status == 200
        async with http.get(f"http://{metrics_listen}/metrics") as response:
            assert response.status == 200
            scrape = Scrape(await response.text())
        assert scrape.value("ollama_gateway_requests_total", method="GET", status="200") == 1
        async with http.get(gw.url + "/metrics") as response:
            assert "ollama_gateway_" not in await response.text()
    access = [line for line in gw.stderr.splitlines() if " INFO access " in line]
    assert len(access) == 2  # /api/version and the refused /metrics on the main port
    assert "method=GET" in access[0].split() and "path=/api/version" in access[0].split()
    # `level: warning` hides info events (start, shutdown) but keeps the access log.
    assert not [line for line in gw.stderr.splitlines() if " INFO gateway" in line]
