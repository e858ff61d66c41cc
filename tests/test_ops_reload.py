"""Hot reload of a running `serve` process by SIGHUP.

Users, roles, routes, limits and the upstream change without a restart; a bad file keeps the
old config, logs every problem and counts the failure; streams in flight finish under the
config they started with; `--listen`/`--upstream` stay in force.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.keys import METRICS, STATE
from gateway.server import reload_config
from tests.auth_support import FAST_BCRYPT, basic
from tests.conftest import GatewayFactory, gateway_process
from tests.fake_ollama import FakeOllama
from tests.ops_support import write_config

ALICE = basic("alice", "alice-password")
BOB = basic("bob", "bob-password")
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
CLOSED_PORT_URL = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {"alice": FAST_BCRYPT.hash("alice-password"), "bob": FAST_BCRYPT.hash("bob-password")}


@pytest.fixture
async def fake_b() -> AsyncIterator[FakeOllama]:
    server = await FakeOllama(version="0.99.0").start()
    try:
        yield server
    finally:
        await server.close()


def settings(
    upstream: str, users: dict[str, Any], routes: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "upstream": {"url": upstream},
        "auth": {"users": users},
        "routes": routes,
        **extra,
    }


GENERATE_FOR_USERS = {"path": "/api/generate", "methods": ["POST"], "roles": ["user"]}
METRICS_FOR_ADMINS = {"path": "/metrics", "methods": ["GET"], "roles": ["admin"]}


async def status(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any] | None = None,
) -> int:
    if body is None:
        async with http.get(url, headers=headers) as resp:
            await resp.read()
            return resp.status
    async with http.post(url, json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_sighup_swaps_users_upstream_routes_and_limits(
    tmp_path: Path, fake: FakeOllama, fake_b: FakeOllama, hashes: dict[str, str]
) -> None:
    path = write_config(
        tmp_path / "gateway.yaml",
        settings(
            fake.url,
            {"alice": {"password": hashes["alice"], "roles": ["user"]}},
            [GENERATE_FOR_USERS],
        ),
    )
    async with gateway_process(path, tmp_path) as gw, aiohttp.ClientSession() as http:
        generate, version = f"{gw.url}/api/generate", f"{gw.url}/api/version"
        assert await status(http, generate, ALICE, GENERATE) == 200
        assert await status(http, generate, BOB, GENERATE) == 401
        assert await status(http, version, {}) == 403  # no route for it yet
        assert len(fake.requests_to("/api/generate")) == 1

        write_config(
            path,
            settings(
                fake_b.url,
                {"bob": {"password": hashes["bob"], "roles": ["user"]}},
                [GENERATE_FOR_USERS, {"path": "/api/version", "methods": ["GET"], "public": True}],
                roles={
                    "user": {"models": ["*"], "limits": {"requests_per_minute": 1, "burst": 1}},
                    "admin": {"models": ["*"]},
                },
            ),
        )
        await gw.reload(r"config reloaded from .* \(generation 1\)")

        assert await status(http, generate, ALICE, GENERATE) == 401  # user removed
        assert await status(http, generate, BOB, GENERATE) == 200  # user added
        assert len(fake_b.requests_to("/api/generate")) == 1  # new upstream
        assert len(fake.requests_to("/api/generate")) == 1  # old one no longer used
        async with http.get(version) as resp:  # new route, served by the new upstream
            assert resp.status == 200
            assert (await resp.json())["version"] == "0.99.0"
        async with http.post(generate, json=GENERATE, headers=BOB) as resp:
            assert resp.status == 429  # new limit: one request per minute
            assert "Retry-After" in resp.headers


async def test_a_bad_file_keeps_the_old_config_and_logs_every_problem(
    tmp_path: Path, fake: FakeOllama, hashes: dict[str, str]
) -> None:
    good = settings(
        fake.url,
        {"alice": {"password": hashes["alice"], "roles": ["user", "admin"]}},
        [GENERATE_FOR_USERS, METRICS_FOR_ADMINS],
    )
    path = write_config(tmp_path / "gateway.yaml", good)
    async with gateway_process(path, tmp_path) as gw, aiohttp.ClientSession() as http:
        generate = f"{gw.url}/api/generate"
        bad = settings(
            "ftp://ollama",
            {"alice": {"password": "hunter2-not-a-hash", "roles": ["ghost"]}},
            [{"path": "/api/generate", "methods": ["POST"]}],
            shutdown_grase=5,
        )
        write_config(path, bad)
        await gw.reload(r"reload of .* failed \(\d+ problem\(s\)\); still serving generation 0")
        refused = [line for line in gw.lines if "reload refused:" in line]
        for key in (
            "shutdown_grase",
            "upstream.url",
            "auth.users.alice.password",
            "auth.users.alice.roles",
            "routes[0]",
        ):
            assert any(f"reload refused: {key}" in line for line in refused), (key, refused)
        assert not any("hunter2" in line for line in gw.lines)  # no secret in logs

        assert await status(http, generate, ALICE, GENERATE) == 200  # still the old config
        async with http.get(f"{gw.url}/metrics", headers=ALICE) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'ollama_gateway_config_reloads_total{result="failure"} 1.0' in text

        # Fixed file: taken, and counted as a success.
        write_config(path, good)
        await gw.reload(r"config reloaded from .* \(generation 1\)")
        async with http.get(f"{gw.url}/metrics", headers=ALICE) as resp:
            text = await resp.text()
        assert 'ollama_gateway_config_reloads_total{result="success"} 1.0' in text


async def test_a_stream_in_flight_finishes_on_the_old_config(
    tmp_path: Path, fake: FakeOllama, hashes: dict[str, str]
) -> None:
    fake.hang_after_chunks = 1  # the stream stays open until the test lets it go on
    path = write_config(
        tmp_path / "gateway.yaml",
        settings(
            fake.url,
            {"alice": {"password": hashes["alice"], "roles": ["user"]}},
            [GENERATE_FOR_USERS],
        ),
    )
    async with gateway_process(path, tmp_path) as gw, aiohttp.ClientSession() as http:
        body = {"model": "llama3.2", "prompt": "a long story"}
        async with http.post(f"{gw.url}/api/generate", json=body, headers=ALICE) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            # Alice removed and the upstream moved away while her stream runs.
            write_config(
                path,
                settings(
                    CLOSED_PORT_URL,
                    {"bob": {"password": hashes["bob"], "roles": ["user"]}},
                    [GENERATE_FOR_USERS],
                ),
            )
            await gw.reload(r"config reloaded from .* \(generation 1\)")
            assert await status(http, f"{gw.url}/api/generate", ALICE, GENERATE) == 401
            fake.resume()
            rest = await resp.content.read()
        records = [json.loads(x) for x in [first, *rest.splitlines()] if x.strip()]
        assert len(records) == fake.chunks + 1
        assert records[-1]["done"] is True
        assert len(fake.requests_to("/api/generate")) == 1  # the old upstream, to the end


async def test_cli_overrides_stay_in_force_after_reload(
    tmp_path: Path, fake: FakeOllama, hashes: dict[str, str]
) -> None:
    users = {"alice": {"password": hashes["alice"], "roles": ["user"]}}
    path = write_config(
        tmp_path / "gateway.yaml",
        {
            **settings(CLOSED_PORT_URL, users, [GENERATE_FOR_USERS]),
            "listen": "127.0.0.1:1",
        },
    )
    async with (
        gateway_process(path, tmp_path, "--listen", "127.0.0.1:0", "--upstream", fake.url) as gw,
        aiohttp.ClientSession() as http,
    ):
        users["bob"] = {"password": hashes["bob"], "roles": ["user"]}
        write_config(
            path,
            {
                **settings(CLOSED_PORT_URL, users, [GENERATE_FOR_USERS]),
                "listen": "127.0.0.1:2",
            },
        )
        await gw.reload(r"config reloaded from .* \(generation 1\)")
        assert await status(http, f"{gw.url}/api/generate", BOB, GENERATE) == 200
        assert len(fake.requests_to("/api/generate")) == 1  # --upstream, not the file's
        assert not any("restart to apply" in line for line in gw.lines)  # --listen kept


async def test_settings_that_need_a_restart_are_kept_and_named(
    tmp_path: Path, fake: FakeOllama, hashes: dict[str, str]
) -> None:
    users = {"alice": {"password": hashes["alice"], "roles": ["user"]}}
    path = write_config(tmp_path / "gateway.yaml", settings(fake.url, users, [GENERATE_FOR_USERS]))
    async with gateway_process(path, tmp_path) as gw, aiohttp.ClientSession() as http:
        write_config(
            path,
            {
                **settings(fake.url, users, [GENERATE_FOR_USERS]),
                "listen": "127.0.0.1:1",
                "shutdown_grace": 3,
            },
        )
        await gw.reload(r"config reloaded from .* \(generation 1\)")
        await gw.wait_line(
            r"listen changed to '127\.0\.0\.1:1': restart to apply "
            r"\(still '127\.0\.0\.1:0'\)"
        )
        await gw.wait_line(r"shutdown_grace changed to 3\.0: restart to apply \(still 30\.0\)")
        assert await status(http, f"{gw.url}/api/generate", ALICE, GENERATE) == 200


async def test_reload_config_in_process(
    gateway_factory: GatewayFactory, fake: FakeOllama, hashes: dict[str, str]
) -> None:
    """The same reload, without a process: what embedders (and SIGHUP) call."""
    users = {"alice": {"password": hashes["alice"], "roles": ["user"]}}
    gw = await gateway_factory(settings(fake.url, users, [GENERATE_FOR_USERS]))
    holder = gw.app[STATE]
    old = holder.current

    users["bob"] = {"password": hashes["bob"], "roles": ["user"]}
    write_config(gw.config_path, settings(fake.url, users, [GENERATE_FOR_USERS]))
    assert await reload_config(gw.app, gw.config_path) is True
    assert holder.current.generation == old.generation + 1
    assert "bob" in holder.current.config.auth.users
    assert "bob" not in old.config.auth.users  # the old state is untouched, not edited

    write_config(gw.config_path, {"upstream": {"url": "nope"}})
    assert await reload_config(gw.app, gw.config_path) is False
    assert holder.current.generation == old.generation + 1  # nothing swapped
    registry = gw.app[METRICS].registry
    for result in ("success", "failure"):
        count = registry.get_sample_value("ollama_gateway_config_reloads_total", {"result": result})
        assert count == 1, result
