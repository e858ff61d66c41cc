"""`serve` as a process: the printed address, CLI overrides, SIGTERM drain, pidfile + reload."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.context import RequestContext
from gateway.keys import LIMITER, OBSERVERS
from tests.conftest import (
    ADMIN_HEADERS,
    ADMIN_KEY_ENTRY,
    GatewayFactory,
    GatewayProcess,
    gateway_process,
    run_cli,
)
from tests.fake_ollama import FakeOllama
from tests.ops_support import write_config

# Public routes: these tests are about the process, not about credentials.
PUBLIC_ROUTES = [
    {"path": "/api/generate", "methods": ["POST"], "public": True},
    {"path": "/api/version", "methods": ["GET"], "public": True},
]
CLOSED_PORT_URL = "http://127.0.0.1:9"  # discard port: nothing listens there


def _json_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.stderr_lines if line.startswith("{")]


def access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [line for line in _json_lines(gw) if line.get("log") == "access"]


def events(gw: GatewayProcess) -> list[dict[str, Any]]:
    return [line for line in _json_lines(gw) if line.get("log") != "access"]


async def test_overrides_win_over_the_file(tmp_path: Path, fake: FakeOllama) -> None:
    # The file names a non-loopback address (with no credentials: refused on its own) and an
    # upstream that does not answer; secure defaults judge the address really listened on.
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": "203.0.113.1:1",
            "upstream": {"url": CLOSED_PORT_URL},
            "routes": PUBLIC_ROUTES,
        },
    )
    async with gateway_process(
        config, tmp_path, "--listen", "127.0.0.1:0", "--upstream", fake.url
    ) as gw:
        assert gw.url.startswith("http://127.0.0.1:")
        assert not gw.url.endswith(":0")
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/api/version") as resp:
            assert resp.status == 200
            assert (await resp.json())["version"] == fake.version
        assert len(fake.requests_to("/api/version")) == 1
        # Exactly one line on stdout says where it listens.
        assert sum("listening on" in line for line in gw.lines) == 1


async def test_bad_override_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", {"routes": PUBLIC_ROUTES})
    code, _out, err = await run_cli(
        "serve", "--config", str(config), "--listen", "nowhere", "--upstream", "ftp://x"
    )
    assert code == 2
    assert "--listen: must be HOST:PORT" in err
    assert "--upstream: must be an http:// or https:// URL" in err


async def test_sigterm_lets_the_stream_finish_and_refuses_new_connections(
    tmp_path: Path, fake: FakeOllama
) -> None:
    fake.hang_after_chunks = 1  # the stream stays open until the test lets it go on
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "upstream": {"url": fake.url},
            "routes": PUBLIC_ROUTES,
            "shutdown_grace": 20,
        },
    )
    async with gateway_process(config, tmp_path, "--listen", "127.0.0.1:0") as gw:
        async with aiohttp.ClientSession() as http:
            body = {"model": "llama3.2", "prompt": "tell me a story"}
            async with http.post(f"{gw.url}/api/generate", json=body) as resp:
                assert resp.status == 200
                first = await resp.content.readline()
                assert json.loads(first)["done"] is False  # the stream is under way

                gw.send(signal.SIGTERM)
                await gw.wait_line("no longer accepting connections")
                # The listening socket is closed: a new client is refused at once...
                async with aiohttp.ClientSession() as other:
                    with pytest.raises(aiohttp.ClientConnectorError):
                        await other.get(f"{gw.url}/healthz")
                assert gw.process.returncode is None  # ...while the stream goes on
                fake.resume()
                rest = await resp.content.read()

        records = [json.loads(line) for line in [first, *rest.splitlines()] if line.strip()]
        assert len(records) == fake.chunks + 1
        assert records[-1]["done"] is True
        assert records[-1]["done_reason"] == "stop"
        assert await gw.wait_exit() == 0
    # A stream that finished during shutdown is a completed one, logged as such.
    (streamed,) = [a for a in access_lines(gw) if a["path"] == "/api/generate"]
    assert streamed["outcome"] == "completed"
    assert streamed["status"] == 200


async def test_sigterm_cancels_what_outlives_the_grace(tmp_path: Path, fake: FakeOllama) -> None:
    """shutdown_grace bounds the whole drain: the stream is ended then, logged `shutdown`."""
    fake.hang_after_chunks = 1  # a stream that would never end
    grace = 1.5
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "listen": "127.0.0.1:0",
            "upstream": {"url": fake.url},
            "routes": PUBLIC_ROUTES,
            "shutdown_grace": grace,
            "logging": {"level": "info", "format": "json"},
        },
    )
    async with gateway_process(config, tmp_path) as gw:
        async with aiohttp.ClientSession() as http:
            body = {"model": "llama3.2", "prompt": "hi"}
            async with http.post(f"{gw.url}/api/generate", json=body) as resp:
                await resp.content.readline()
                loop = asyncio.get_running_loop()
                signalled = loop.time()
                gw.send(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.content.read()  # cut after the grace, without a done record
                cut_after = loop.time() - signalled
        assert await gw.wait_exit(wait_s=10) == 0
        exited_after = loop.time() - signalled
        # The upstream request was closed too (Ollama stops generating).
        await fake.wait_client_gone()
    # Not before the grace, and not twice the grace (aiohttp's own drain waits twice).
    assert grace - 0.1 <= cut_after < grace + 1.0, cut_after
    assert exited_after < grace + 2.0, exited_after
    (streamed,) = [a for a in access_lines(gw) if a["path"] == "/api/generate"]
    assert streamed["outcome"] == "shutdown"
    assert streamed["status"] == 200  # the status line had been sent
    assert any("ending 1 request(s) still running" in e.get("message", "") for e in events(gw))


async def test_sigterm_with_nothing_in_flight_exits_at_once(
    tmp_path: Path, fake: FakeOllama
) -> None:
    config = {"upstream": {"url": fake.url}, "routes": PUBLIC_ROUTES, "shutdown_grace": 30}
    async with (
        gateway_process(config, tmp_path) as gw,
        aiohttp.ClientSession() as http,
        http.get(f"{gw.url}/api/version") as resp,
    ):
        assert resp.status == 200  # an idle keep-alive connection stays open
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        assert await gw.stop(wait_s=10) == 0
        assert loop.time() - signalled < 3.0  # idle connections do not wait for the grace


async def test_reload_command_with_pidfile(tmp_path: Path, fake: FakeOllama) -> None:
    config = write_config(
        tmp_path / "gateway.yaml", {"listen": "127.0.0.1:0", "upstream": {"url": fake.url}}
    )
    pidfile = tmp_path / "gateway.pid"
    async with gateway_process(config, tmp_path, "--pidfile", str(pidfile)) as gw:
        assert int(pidfile.read_text()) == gw.process.pid
        code, out, _err = await run_cli("reload", "--pidfile", str(pidfile))
        assert code == 0, out
        assert f"sent SIGHUP to {gw.process.pid}" in out
        await gw.wait_line(r"config reloaded from .* \(generation 1\)")
        assert await gw.stop() == 0
    assert not pidfile.exists()  # removed on exit

    code, _out, err = await run_cli("reload", "--pidfile", str(pidfile))
    assert code == 1
    assert "cannot read a pid" in err


@pytest.mark.parametrize(("choice", "expected"), [("asyncio", False), ("uvloop", True)])
async def test_event_loop_choice(
    fake: FakeOllama, tmp_path: Path, choice: str, expected: bool
) -> None:
    """uvloop by default when installed; OLLAMA_GATEWAY_LOOP=asyncio opts out (README)."""
    config = {"upstream": {"url": fake.url}, "listen": "127.0.0.1:0"}
    async with gateway_process(config, tmp_path, env={"OLLAMA_GATEWAY_LOOP": choice}) as gw:
        maps = await asyncio.to_thread(Path(f"/proc/{gw.process.pid}/maps").read_text)
    assert ("uvloop" in maps) is expected


async def test_client_leaving_right_after_the_last_byte_is_completed(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """The handler is cancelled while limits settle up after the stream: still `completed`."""
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "auth": {"api_keys": [ADMIN_KEY_ENTRY]},
            "roles": {
                "admin": {"models": ["*"], "limits": {"tokens_per_minute": 10_000}},
                "user": {"models": ["*"]},
            },
        }
    )
    limiter = gw.app[LIMITER]
    client_gone, settled = asyncio.Event(), asyncio.Event()
    real_finish = limiter.finish

    async def finish_once_the_client_left(*args: Any) -> None:
        await client_gone.wait()  # as a Redis round trip would, past the client's close
        await real_finish(*args)
        settled.set()

    limiter.finish = finish_once_the_client_left  # type: ignore[method-assign]
    limiter.remote = True  # type: ignore[misc]  # settled in the background, as Redis is
    observed: list[RequestContext] = []
    logged = asyncio.Event()

    def observe(ctx: RequestContext) -> None:
        observed.append(ctx)
        logged.set()

    gw.app[OBSERVERS].append(observe)

    connector = aiohttp.TCPConnector(force_close=True)  # the client closes after the response
    async with aiohttp.ClientSession(connector=connector) as http:
        body = {"model": "llama3.2", "prompt": "hi"}
        async with http.post(f"{gw.url}/api/generate", json=body, headers=ADMIN_HEADERS) as resp:
            records = [json.loads(line) for line in (await resp.read()).splitlines()]
    assert records[-1]["done"] is True  # the client got the whole stream, then left

    await asyncio.wait_for(logged.wait(), 5)  # logged as the handler's cancellation unwinds
    client_gone.set()
    await asyncio.wait_for(settled.wait(), 5)
    (ctx,) = observed
    assert ctx.outcome == "completed"
    assert ctx.status == 200
