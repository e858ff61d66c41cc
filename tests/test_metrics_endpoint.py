"""The /metrics endpoint: protected by default, public on request, optionally on its own port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gateway.metrics_http import start_metrics_listener
from tests import auth_support
from tests.conftest import GatewayFactory, RunningGateway, free_port
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Scrape, pbkdf2_hash

PASSWORD = "correct horse battery staple"


def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
    return auth_support.basic(user, password)


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
    gw = await gateway_factory(users_config(fake.url))
    async with http.get(gw.url + "/metrics", headers=basic("ops")) as response:
        assert response.status == 200
        assert "ollama_gateway_build_info" in await response.text()
    async with http.get(gw.url + "/metrics", headers=basic("bob")) as response:
        assert response.status == 403
    async with http.get(gw.url + "/metrics", headers=basic("ops", "wrong")) as response:
        assert response.status == 401


@contextlib.asynccontextmanager
async def metrics_listener(gw: RunningGateway) -> AsyncIterator[str]:
    """The listener `metrics.listen` names, started as `serve` starts it -> its base URL."""
    listen = gw.config.metrics.listen
    assert listen is not None
    runner = await start_metrics_listener(gw.app, listen)
    try:
        yield f"http://{listen}"
    finally:
        await runner.cleanup()


async def test_separate_listener_serves_metrics_and_main_listener_does_not(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory(
        {"upstream": {"url": fake.url}, "metrics": {"public": True, "listen": listen}}
    )
    async with metrics_listener(gw) as metrics_url:
        async with http.get(gw.url + "/api/version") as response:
            assert response.status == 200
        async with http.get(f"{metrics_url}/metrics") as response:
            assert response.status == 200
            scrape = Scrape(await response.text())
        # The main listener's traffic shows on the metrics port (one registry).
        assert scrape.value("ollama_gateway_requests_total", method="GET", status="200") == 1
        async with http.get(gw.url + "/metrics") as response:
            assert response.status == 404
            assert "ollama_gateway_" not in await response.text()
        assert not fake.requests_to("/metrics")  # never relayed either
        async with http.get(f"{metrics_url}/api/version") as response:
            assert response.status == 404  # the metrics port serves metrics only
        assert len(fake.requests_to("/api/version")) == 1


async def test_separate_listener_still_needs_credentials_unless_public(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    gw = await gateway_factory({"upstream": {"url": fake.url}, "metrics": {"listen": listen}})
    async with (
        metrics_listener(gw) as metrics_url,
        http.get(f"{metrics_url}/metrics") as response,
    ):
        assert response.status == 401
        assert "ollama_gateway_" not in await response.text()


async def test_separate_listener_accepts_a_metrics_role(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(users_config(fake.url, listen=f"127.0.0.1:{free_port()}"))
    async with metrics_listener(gw) as metrics_url:
        async with http.get(f"{metrics_url}/metrics", headers=basic("ops")) as response:
            assert response.status == 200
        async with http.get(f"{metrics_url}/metrics", headers=basic("bob")) as response:
            assert response.status == 403
