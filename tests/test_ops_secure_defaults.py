"""Secure defaults: what `serve` refuses (exit 2, clear message) and what it warns about.

Only loopback traffic: a gateway bound to 0.0.0.0 is reached through 127.0.0.1.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import cli_env, gateway_process, run_cli
from tests.fake_ollama import FakeOllama
from tests.ops_support import write_config

API_KEY = {"name": "ci", "sha256": "ab" * 32}  # a credential; nobody needs to know the key
NO_CREDENTIALS = "no credentials are configured"


def exposed(fake: FakeOllama, **extra: Any) -> dict[str, Any]:
    """On every interface, with a credential: allowed to start."""
    return {
        "listen": "0.0.0.0:0",
        "upstream": {"url": fake.url},
        "auth": {"api_keys": [API_KEY]},
        **extra,
    }


async def test_refuses_a_network_address_without_credentials(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", {"listen": "127.0.0.1:0"})
    # `check` reads `listen` from the file, and says the same.
    exposed = write_config(tmp_path / "exposed.yaml", {"listen": "[::]:8080"})
    (code, out, err), (check_code, check_out, _err) = await asyncio.gather(
        run_cli("serve", "--config", str(config), "--listen", "0.0.0.0:0"),
        run_cli("check", "--config", str(exposed)),
    )
    assert code == 2
    assert "refusing to start" in err
    assert f"auth: {NO_CREDENTIALS}" in err
    assert "0.0.0.0:0" in err
    assert "listening on" not in out
    assert check_code == 2
    assert f"auth: {NO_CREDENTIALS}" in check_out


async def test_loopback_without_credentials_is_fine(tmp_path: Path) -> None:
    config = write_config(tmp_path / "gateway.yaml", {"listen": "localhost:8080"})
    code, out, err = await run_cli("check", "--config", str(config))
    assert (code, err) == (0, "")
    assert out.strip().endswith(": ok")


async def test_refuses_a_short_hs_secret(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "auth": {"jwt": {"algorithms": ["HS256"], "secret": "${SHORT_SECRET}"}},
        },
    )
    env = cli_env(SHORT_SECRET="too-short-secret")  # 16 bytes
    (code, out, err), (check_code, check_out, _err) = await asyncio.gather(
        run_cli("serve", "--config", str(config), env=env),
        run_cli("check", "--config", str(config), env=env),
    )
    assert code == 2
    assert "listening on" not in out
    problem_lines = [line for line in err.splitlines() if "auth.jwt.secret" in line]
    assert len(problem_lines) == 1, err  # said once, whoever checks it
    assert "32" in problem_lines[0]
    assert "too-short-secret" not in err  # the secret itself is never printed

    assert check_code == 2
    assert sum("auth.jwt.secret" in line for line in check_out.splitlines()) == 1


async def test_network_address_with_credentials_starts_and_warns(
    tmp_path: Path, fake: FakeOllama
) -> None:
    # Even a route table calling /metrics public does not make the metrics public.
    routes = [{"path": "/metrics", "methods": ["GET"], "public": True}]
    config = write_config(tmp_path / "gateway.yaml", exposed(fake, routes=routes))
    async with gateway_process(config, tmp_path) as gw:
        port = gw.url.rsplit(":", 1)[1]
        await gw.wait_line(r"serving plain HTTP on 0\.0\.0\.0:0, a non-loopback address")
        async with aiohttp.ClientSession() as http:
            # Metrics are not public unless `metrics.public: true` says so.
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 401
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200


async def test_public_metrics_on_a_network_address_must_be_explicit(
    tmp_path: Path, fake: FakeOllama
) -> None:
    config = write_config(tmp_path / "gateway.yaml", exposed(fake, metrics={"public": True}))
    async with gateway_process(config, tmp_path) as gw:
        port = gw.url.rsplit(":", 1)[1]
        await gw.wait_line(
            r"metrics\.public is true: /metrics on 0\.0\.0\.0:0 needs no "
            r"credentials"
        )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            assert resp.status == 200
            assert "ollama_gateway_config_reloads_total" in await resp.text()


async def test_reload_refuses_a_config_that_fails_them(tmp_path: Path, fake: FakeOllama) -> None:
    settings = exposed(fake, metrics={"public": True})
    config = write_config(tmp_path / "gateway.yaml", settings)
    async with gateway_process(config, tmp_path) as gw:
        port = gw.url.rsplit(":", 1)[1]
        # Dropping every credential while exposed on the network: refused, old config kept.
        write_config(config, {**settings, "auth": {}})
        await gw.reload(rf"reload refused: auth: {NO_CREDENTIALS}")
        await gw.wait_line(r"still serving generation 0")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
        assert 'ollama_gateway_config_reloads_total{result="failure"} 1.0' in text
        assert 'ollama_gateway_config_reloads_total{result="success"} 0.0' in text
