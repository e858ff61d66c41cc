"""The /metrics endpoint: protected by default, public on request, optionally on its own port."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp

from gateway.metrics_http import start_metrics_listener
from tests.conftest import GatewayFactory
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Scrape, pbkdf2_hash
from tests.metrics_support import basic as basic_header

PASSWORD = "correct horse battery staple"


def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
    return basic_header(user, password)


def users_config(url: str, **metrics: Any) -> dict[str, Any]:
    digest = pbkdf2_hash(PASSWORD)
    return {
        "upstream": {"url": url},
        "auth": {
            "users": {
                "ops": {"password": digest, "roles": ["admin"]},
                "bob": {"password": digest, "roles": ["user"]},
            }
        },
        "metrics": metrics,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_metrics_need_credentials_by_default(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory({"upstream": {"url": fake.url}})
    async with http.get(gw.url + "/metrics") as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")
        body = await response.json()
    assert set(body) == {"error"}
    assert not fake.requests_to("/metrics")  # never relayed


async def test_public_metrics_are_prometheus_text(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory({"upstream": {"url": fake.url}, "metrics": {"public": True}})
    async with http.get(gw.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert "ollama_gateway_build_info" in text
    async with http.post(gw.url + "/metrics", data=b"{}") as response:
        assert response.status == 405
    assert not fake.requests_to("/metrics")
    async with http.get(
        gw.url + "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    ) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_metrics_path_is_configurable(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        {"upstream": {"url": fake.url}, "metrics": {"public": True, "path": "/internal/metrics"}}
    )
    async with http.get(gw.url + "/internal/metrics") as response:
        assert response.status == 200
        assert "ollama_gateway_requests_total" in await response.text()


async def test_metrics_need_a_metrics_role(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Waits on the authentication issue: the placeholder refuses every credential."""
    gw = await gateway_factory(users_config(fake.url))
    async with http.get(gw.url + "/metrics", headers=basic("ops")) as response:
        assert response.status == 200
        assert "ollama_gateway_build_info" in await response.text()
    async with http.get(gw.url + "/metrics", headers=basic("bob")) as response:
        assert response.status == 403
    async with http.get(gw.url + "/metrics", headers=basic("ops", "wrong")) as response:
        assert response.status == 401


async def test_separate_listener_serves_metrics_and_main_listener_does_not(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory(
        {"upstream": {"url": fake.url}, "metrics": {"public": True, "listen": listen}}
    )
    runner = await start_metrics_listener(gw.app, listen)
    try:
        async with http.get(gw.url + "/api/version") as response:
            assert response.status == 200
        async with http.get(f"http://{listen}/metrics") as response:
            assert response.status == 200
            scrape = Scrape(await response.text())
        # The main listener's traffic shows on the metrics port (one registry).
        assert scrape.value("ollama_gateway_requests_total", method="GET", status="200") == 1
        async with http.get(gw.url + "/metrics") as response:
            assert response.status == 404
            assert "ollama_gateway_" not in await response.text()
        assert not fake.requests_to("/metrics")  # never relayed either
        async with http.get(f"http://{listen}/api/version") as response:
            assert response.status == 404  # the metrics port serves metrics only
        assert len(fake.requests_to("/api/version")) == 1
    finally:
        await runner.cleanup()


async def test_separate_listener_still_needs_credentials_unless_public(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory({"upstream": {"url": fake.url}, "metrics": {"listen": listen}})
    runner = await start_metrics_listener(gw.app, listen)
    try:
        async with http.get(f"http://{listen}/metrics") as response:
            assert response.status == 401
            assert "ollama_gateway_" not in await response.text()
    finally:
        await runner.cleanup()


async def test_separate_listener_accepts_a_metrics_role(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Waits on the authentication issue: the placeholder refuses every credential."""
    listen = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory(users_config(fake.url, listen=listen))
    runner = await start_metrics_listener(gw.app, listen)
    try:
        async with http.get(f"http://{listen}/metrics", headers=basic("ops")) as response:
            assert response.status == 200
        async with http.get(f"http://{listen}/metrics", headers=basic("bob")) as response:
            assert response.status == 403
    finally:
        await runner.cleanup()
