"""Prometheus series move as traffic flows through the real gateway (fake Ollama behind it)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

import gateway as package
from gateway.keys import METRICS
from gateway.metrics import LATENCY_BUCKETS, OVERHEAD_BUCKETS
from tests.conftest import GatewayFactory, RunningGateway, free_port, require_binary, run_command
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed, Scrape, scrape

GENERATE = {"model": "llama3.2", "prompt": "why is the sky blue?"}


def public(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": {"url": url, **extra.pop("upstream", {})},
        "metrics": {"public": True, **extra.pop("metrics", {})},
        **extra,
    }


async def _generate(http: aiohttp.ClientSession, gw: RunningGateway, **body: Any) -> bytes:
    async with http.post(gw.url + "/api/generate", json={**GENERATE, **body}) as response:
        assert response.status == 200
        return await response.read()


async def test_requests_are_counted_by_route_class_method_status_and_user(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(public(fake.url))
    observed = Observed(gw.app)
    for _ in range(3):
        async with http.get(gw.url + "/api/version") as response:
            assert response.status == 200
    body = await _generate(http, gw)
    async with http.get(gw.url + "/api/nope") as response:
        not_found = response.status
    contexts = await observed.wait(5)
    version_class, generate_class = contexts[0].route_class, contexts[3].route_class

    s = await scrape(http, gw.url)
    requests = "ollama_gateway_requests_total"
    assert (
        s.value(requests, route_class=version_class, method="GET", status="200", user="anonymous")
        == 3
    )
    assert s.value(requests, route_class=generate_class, method="POST", status="200") == 1
    assert s.value(requests, method="GET", status=str(not_found)) == 1
    assert s.value("ollama_gateway_request_duration_seconds_count") == 5
    # Every relayed request went upstream once: overhead and TTFB observed for each.
    relayed = sum(1 for c in contexts if c.upstream_started is not None)
    assert relayed >= 4
    assert s.value("ollama_gateway_overhead_seconds_count") == relayed
    assert s.value("ollama_gateway_upstream_ttfb_seconds_count") == relayed
    assert s.value("ollama_gateway_response_bytes_total", route_class=generate_class) >= len(body)
    assert s.value("ollama_gateway_requests_in_flight") == 1  # the scrape itself


async def test_latency_buckets_fit_llm_work(gateway: RunningGateway) -> None:
    """Milliseconds (tags) to an hour (cold loads, long generations, pulls)."""
    s = Scrape(_text(gateway))
    assert {
        "ollama_gateway_request_duration_seconds",
        "ollama_gateway_upstream_ttfb_seconds",
        "ollama_gateway_overhead_seconds",
    } <= s.names()
    assert LATENCY_BUCKETS[0] <= 0.005 and LATENCY_BUCKETS[-1] >= 3600
    assert OVERHEAD_BUCKETS[0] <= 0.0001


def _text(gw: RunningGateway) -> str:
    return generate_latest(gw.app[METRICS].registry).decode()


async def test_server_timing_shows_what_the_gateway_added(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(public(fake.url))
    async with http.post(gw.url + "/api/generate", json=GENERATE) as response:
        relayed = response.headers.getall("Server-Timing")
        await response.read()
    async with http.get(gw.url + "/healthz") as response:
        own = response.headers.getall("Server-Timing")
    # An inference request also says how long it waited for a slot of its model.
    assert [v.partition(";")[0] for v in relayed] == ["queue", "gateway"]
    for values in (relayed[1:], own):
        assert len(values) == 1 and values[0].startswith("gateway;dur=")
        assert 0 <= float(values[0].removeprefix("gateway;dur=")) < 1000
    assert 0 <= float(relayed[0].removeprefix("queue;dur=")) < 1000


async def test_scrape_passes_promtool(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    promtool = require_binary("promtool")
    gw = await gateway_factory(public(fake.url))
    observed = Observed(gw.app)
    await _generate(http, gw)
    async with http.get(gw.url + "/api/tags", headers={"Authorization": "Basic Zm9vOmJhcg=="}):
        pass
    await observed.wait(2)
    exported = await scrape(http, gw.url)
    assert exported.value("ollama_gateway_tokens_total") > 0  # every family has samples
    assert exported.value("ollama_gateway_auth_failures_total") == 1
    text = exported.text
    code, out, err = await run_command(promtool, "check", "metrics", stdin=text.encode())
    assert code == 0, out + err


async def test_upstream_up_gauge_follows_readyz(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    upstream = await FakeOllama().start()
    try:
        gw = await gateway_factory(public(upstream.url))
        async with http.get(gw.url + "/readyz") as response:
            assert response.status == 200
        assert (await scrape(http, gw.url)).value("ollama_gateway_upstream_up") == 1
    finally:
        await upstream.close()
    async with http.get(gw.url + "/readyz") as response:
        assert response.status == 503
    assert (await scrape(http, gw.url)).value("ollama_gateway_upstream_up") == 0


async def test_refused_upstream_is_counted(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(public(f"http://127.0.0.1:{free_port()}"))  # nothing listens
    async with http.get(gw.url + "/api/tags") as response:
        assert response.status == 502
    s = await scrape(http, gw.url)
    assert s.value("ollama_gateway_upstream_errors_total", kind="refused") == 1
    assert s.value("ollama_gateway_requests_total", status="502") == 1


async def test_timed_out_upstream_is_counted(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    fake.first_byte_delay = 30
    gw = await gateway_factory(public(fake.url, upstream={"read_timeout": 0.2}))
    async with http.post(gw.url + "/api/generate", json=GENERATE) as response:
        assert response.status == 504
    s = await scrape(http, gw.url)
    assert s.value("ollama_gateway_upstream_errors_total", kind="timeout") == 1
    assert s.value("ollama_gateway_requests_total", status="504") == 1


async def test_upstream_reset_mid_stream_is_counted(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    fake.abort_mid_stream_after = 2
    gw = await gateway_factory(public(fake.url))
    observed = Observed(gw.app)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(gw.url + "/api/generate", json=GENERATE) as response:
            await response.read()
    [ctx] = await observed.wait(1)
    assert ctx.outcome == "upstream_error"
    s = await scrape(http, gw.url)
    assert s.value("ollama_gateway_upstream_errors_total", kind="reset") == 1
    assert s.value("ollama_gateway_client_disconnects_total") == 0


async def test_client_disconnect_and_in_flight(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    fake.hang_after_chunks = 1
    gw = await gateway_factory(public(fake.url))
    observed = Observed(gw.app)
    response = await http.post(gw.url + "/api/generate", json=GENERATE)
    await response.content.readline()
    during = await scrape(http, gw.url)
    assert during.value("ollama_gateway_requests_in_flight") == 2  # the stream + this scrape
    response.close()  # the client goes away mid-stream
    await fake.wait_client_gone()
    contexts = await observed.wait(2)
    stream = contexts[-1]
    assert stream.outcome == "client_gone"
    after = await scrape(http, gw.url)
    assert (
        after.value("ollama_gateway_client_disconnects_total", route_class=stream.route_class) == 1
    )
    assert after.value("ollama_gateway_requests_in_flight") == 1
    assert after.value("ollama_gateway_upstream_errors_total") == 0


async def test_build_info_and_reload_counters(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    metrics = gateway.app[METRICS]
    metrics.config_reloads.labels(result="failure").inc()
    metrics.rate_limit_store_error()
    s = Scrape(_text(gateway))
    assert s.value("ollama_gateway_build_info", version=package.__version__) == 1
    assert s.value("ollama_gateway_config_reloads_total", result="success") == 0
    assert s.value("ollama_gateway_config_reloads_total", result="failure") == 1
    assert s.value("ollama_gateway_rate_limit_store_errors_total") == 1


async def test_every_app_has_its_own_registry(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    first = await gateway_factory(public(fake.url))
    second = await gateway_factory(public(fake.url))
    observed = Observed(first.app)
    await _generate(http, first)
    await observed.wait(1)
    assert (await scrape(http, first.url)).value("ollama_gateway_requests_total") == 1
    assert (await scrape(http, second.url)).value("ollama_gateway_requests_total") == 0


async def test_user_label_off_drops_the_label_everywhere(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(public(fake.url, metrics={"user_label": False}))
    observed = Observed(gw.app)
    await _generate(http, gw)
    await observed.wait(1)
    s = await scrape(http, gw.url)
    assert s.labelsets("ollama_gateway_requests_total")
    assert all("user" not in labels for labels in s.labelsets("ollama_gateway_requests_total"))
    assert "# TYPE ollama_gateway_tokens_total counter" in s.text
    assert s.labelsets("ollama_gateway_tokens_total")  # the generation's tokens were counted
    assert all("user" not in labels for labels in s.labelsets("ollama_gateway_tokens_total"))
