"""`ollama-gateway serve` as users run it: access lines on stderr, JSON or text, per `logging`."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.conftest import free_port, gateway_process
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Scrape


async def test_json_access_lines_on_stderr(
    tmp_path: Path, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    config = {"upstream": {"url": fake.url}, "logging": {"level": "info", "format": "json"}}
    prompt = {"model": "llama3.2", "prompt": "PROMPT-XYZ"}
    async with gateway_process(config, tmp_path) as gw:
        async with http.post(gw.url + "/api/generate", json=prompt) as response:
            assert response.status == 200
            request_id = response.headers["X-Request-Id"]
            await response.read()
        assert await gw.stop() == 0  # and every line it logged has been read
    lines = [json.loads(line) for line in gw.stderr_lines if line.strip()]
    access = [line for line in lines if line.get("log") == "access"]
    assert len(access) == 1
    assert access[0]["request_id"] == request_id
    assert access[0]["path"] == "/api/generate" and access[0]["status"] == 200
    events = [line for line in lines if line.get("log") != "access"]
    assert events and all({"time", "level", "logger", "message"} <= set(e) for e in events)
    assert "PROMPT-XYZ" not in gw.stderr_text()


async def test_text_format_level_and_separate_metrics_listener(
    tmp_path: Path, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    metrics_listen = f"127.0.0.1:{free_port()}"
    config = {
        "upstream": {"url": fake.url},
        "logging": {"level": "warning", "format": "text"},
        "metrics": {"public": True, "listen": metrics_listen},
    }
    async with gateway_process(config, tmp_path) as gw:
        async with http.get(gw.url + "/api/version") as response:
            assert response.status == 200
        async with http.get(f"http://{metrics_listen}/metrics") as response:
            assert response.status == 200
            scrape = Scrape(await response.text())
        assert scrape.value("ollama_gateway_requests_total", method="GET", status="200") == 1
        async with http.get(gw.url + "/metrics") as response:
            assert "ollama_gateway_" not in await response.text()
        assert await gw.stop() == 0
    access = [line for line in gw.stderr_lines if " INFO access " in line]
    assert len(access) == 2  # /api/version and the refused /metrics on the main port
    assert "method=GET" in access[0].split() and "path=/api/version" in access[0].split()
    # `level: warning` hides info events (start, shutdown) but keeps the access log.
    assert not [line for line in gw.stderr_lines if " INFO gateway" in line]
