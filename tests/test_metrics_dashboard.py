"""deploy/: the Grafana dashboard only queries series the gateway really exports."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import yaml

from tests.conftest import REPO, GatewayFactory, require_binary, run_command
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed, scrape

DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ollama-gateway.json"
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
# What the dashboard must show (issue: requests, errors, latency, TTFB, tokens, in-flight,
# 429s, auth failures).
REQUIRED = {
    "ollama_gateway_requests_total",
    "ollama_gateway_request_duration_seconds_bucket",
    "ollama_gateway_upstream_ttfb_seconds_bucket",
    "ollama_gateway_tokens_total",
    "ollama_gateway_requests_in_flight",
    "ollama_gateway_rate_limited_total",
    "ollama_gateway_auth_failures_total",
    "ollama_gateway_upstream_errors_total",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (strings, matchers, ranges, groupings dropped)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        if expr[match.end() :].lstrip().startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function or an operator
        names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Labels a PromQL expression groups by (`sum by (route, user) (...)`)."""
    return {
        label.strip()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from panels(item.get("panels", []))


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names |= metric_names(target["expr"])
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        if text.startswith("label_values("):
            names |= metric_names(text.removeprefix("label_values(").rsplit(",", 1)[0])
    return names


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, route_class) (rate(a_bucket{job=~"$job", '
        'x="y(z)"}[$__rate_interval]))) / on(instance) group_left b + sum(c) or vector(0)'
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    assert grouping_labels(expr) == {"le", "route_class"}


def test_a_panel_shows_requests_by_endpoint() -> None:
    """Which endpoints are called (and by whom): the `route` label, on its own panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    by_route = [
        target["expr"]
        for panel in panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if "route" in grouping_labels(target["expr"])
        and "ollama_gateway_requests_total" in metric_names(target["expr"])
    ]
    assert by_route
    assert any("user" in grouping_labels(expr) for expr in by_route)


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "ollama-gateway"
    all_panels = list(panels(dashboard["panels"]))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for panel in all_panels:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}"
    assert dashboard_metric_names(dashboard) >= REQUIRED


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http://prometheus:")
    providers = yaml.safe_load((provisioning / "dashboards" / "ollama-gateway.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


async def test_prometheus_config_passes_promtool() -> None:
    promtool = require_binary("promtool")
    config = str(DEPLOY / "prometheus.yml")
    code, out, err = await run_command(promtool, "check", "config", "--syntax-only", config)
    assert code == 0, out + err


async def test_every_dashboard_series_is_exported(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    key = "og_" + "k" * 40
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "auth": {
                "api_keys": [
                    {
                        "name": "ci-bot",
                        "sha256": hashlib.sha256(key.encode()).hexdigest(),
                        "roles": ["user"],
                    }
                ]
            },
            "metrics": {"public": True},
        }
    )
    observed = Observed(gw.app)
    good = {"X-API-Key": key}
    async with http.post(
        gw.url + "/api/generate", headers=good, json={"model": "llama3.2", "prompt": "hi"}
    ) as response:
        await response.read()
    async with http.get(gw.url + "/api/tags", headers={"X-API-Key": "wrong"}) as response:
        assert response.status == 401
    async with http.get(gw.url + "/readyz") as response:
        assert response.status == 200
    await observed.wait(3)
    exported = await scrape(http, gw.url)

    wanted = dashboard_metric_names(json.loads(DASHBOARD.read_text()))
    assert wanted and all(name.startswith("ollama_gateway_") for name in wanted), wanted
    missing = wanted - exported.names()
    assert not missing, f"dashboard queries series the gateway does not export: {missing}"
    # A panel grouping by a label the series lacks shows one unlabelled line: every grouping
    # label must be on the samples of a series its query reads (when they have samples).
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            carried: set[str] = set()
            samples = [s for s in exported.samples if s.name in metric_names(expr)]
            for sample in samples:
                carried |= set(sample.labels)
            lacking = grouping_labels(expr) - carried - {"instance", "job"}  # Prometheus adds
            assert not samples or not lacking, f"{panel['title']}: no {lacking} in {expr}"
    # The core series carry samples after this traffic, not just declarations.
    sampled = {s.name for s in exported.samples}
    assert {
        "ollama_gateway_requests_total",
        "ollama_gateway_request_duration_seconds_bucket",
        "ollama_gateway_upstream_ttfb_seconds_bucket",
        "ollama_gateway_requests_in_flight",
        "ollama_gateway_upstream_up",
        "ollama_gateway_auth_failures_total",
        "ollama_gateway_build_info",
    } <= sampled


def test_panels_show_the_fair_queue_and_a_row_per_upstream() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    names = dashboard_metric_names(dashboard)
    assert {
        "ollama_gateway_queue_waiting",
        "ollama_gateway_queue_wait_seconds_bucket",
        "ollama_gateway_queue_rejections_total",
        "ollama_gateway_slots_in_use",
        "ollama_gateway_slots",
        "ollama_gateway_queue_tokens_charged_total",
        "ollama_gateway_upstream_server_up",
        "ollama_gateway_upstream_requests_total",
        "ollama_gateway_upstream_server_ttfb_seconds_bucket",
        "ollama_gateway_upstream_failovers_total",
        "ollama_gateway_upstream_models_loaded",
    } <= names
    [row] = [p for p in dashboard["panels"] if p.get("repeat") == "upstream"]
    assert row["type"] == "row"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "upstream" in variables
    # Waiting requests are shown by priority, never by user (a label the series lacks).
    waiting = [
        t["expr"]
        for p in panels(dashboard["panels"])
        for t in p.get("targets", [])
        if "ollama_gateway_queue_waiting" in metric_names(t["expr"])
    ]
    assert waiting and all("user" not in grouping_labels(e) for e in waiting)
