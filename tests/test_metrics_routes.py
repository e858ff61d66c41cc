"""The `route` label (issue 10, item 7): which endpoint each request called, bounded.

Real gateway, real fake Ollama, real scrape: every known endpoint is its own series, globbed
ones under their table entry, and any other path (unmatched, made up, hostile) is `other`.
"""

from __future__ import annotations

import hashlib

import aiohttp
from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from gateway.policy.routes import ROUTE_LABELS
from tests.conftest import ADMIN_HEADERS, ADMIN_KEY_ENTRY, GatewayFactory
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed, scrape
from tests.test_metrics_labels import context, state
from tests.test_metrics_labels import scrape as scrape_of

REQUESTS = "ollama_gateway_requests_total"
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


async def test_requests_duration_and_ttfb_carry_the_route(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    config = {
        "upstream": {"url": fake.url},
        "auth": {"api_keys": [ADMIN_KEY_ENTRY]},
        "metrics": {"roles": ["admin"]},
    }
    gw = await gateway_factory(config)
    blob = b"layer"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    made_up = [f"/api/attack-{i}" for i in range(30)] + ["/API/CHAT/../../etc", "/v2/x"]
    async with aiohttp.ClientSession(headers=ADMIN_HEADERS) as http:
        observed = Observed(gw.app)
        async with http.post(gw.url + "/api/chat", json=CHAT) as r:
            assert r.status == 200
        async with http.post(gw.url + "/API/Chat", json=CHAT) as r:  # authorised as /api/chat
            assert r.status == 404  # Ollama's own answer: its paths are case-sensitive
        async with http.post(gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        async with http.post(f"{gw.url}/api/blobs/{digest}", data=blob) as r:
            assert r.status == 201
        async with http.get(gw.url + "/api/version") as r:
            assert r.status == 200
        for path in made_up:
            async with http.get(gw.url + path) as r:
                assert r.status in (400, 403, 404)
        await observed.wait(5 + len(made_up))
        s = await scrape(http, gw.url, headers=ADMIN_HEADERS)

    requests = "ollama_gateway_requests_total"
    assert s.value(requests, route="/api/chat", route_class="inference", status="200") == 1
    assert s.value(requests, route="/api/chat", route_class="inference") == 2
    assert s.value(requests, route="/v1/chat/completions", method="POST") == 1
    assert s.value(requests, route="/api/blobs/*", route_class="management", status="201") == 1
    assert s.value(requests, route="/api/version", route_class="public") == 1
    assert s.value(requests, route="other") == len(made_up)
    routes = {labels["route"] for labels in s.labelsets(requests)}
    assert routes <= ROUTE_LABELS  # no path a client made up became a series
    assert "/metrics" not in routes  # (this scrape is counted once it has ended)
    for histogram in (
        "ollama_gateway_request_duration_seconds_count",
        "ollama_gateway_upstream_ttfb_seconds_count",
    ):
        assert s.value(histogram, route="/api/chat", route_class="inference") == 2
        assert s.value(histogram, route="/api/blobs/*") == 1
    assert s.value("ollama_gateway_request_duration_seconds_count", route="other") == len(made_up)


def test_a_route_value_outside_the_table_is_other() -> None:
    """Defence in depth: whatever lands in the context, the label set stays fixed."""
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    for i in range(50):
        metrics.observe(context(st, route=f"/junk/{i}", route_class="inference"))
    routes = {labels["route"] for labels in scrape_of(metrics).labelsets(REQUESTS)}
    assert routes == {"other"}
    assert scrape_of(metrics).value(REQUESTS, route="other") == 50
