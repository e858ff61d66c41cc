"""Label values stay bounded whatever callers send: GatewayMetrics.observe on real contexts."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from gateway.auth.principal import Principal
from gateway.config_load import parse_config
from gateway.context import RequestContext, Usage
from gateway.metrics import MAX_MODELS, MAX_ROUTE_CLASSES, GatewayMetrics
from gateway.state import GatewayState
from tests.metrics_support import Scrape, pbkdf2_hash

CONFIG = f"""
auth:
  users:
    alice: {{password: "{pbkdf2_hash("pw")}", roles: [user]}}
  api_keys:
    - {{name: ci-bot, sha256: "{"a" * 64}", roles: [user]}}
    - {{name: deploy-key, sha256: "{"b" * 64}", user: deployer, roles: [user]}}
"""


def state() -> GatewayState:
    return GatewayState.build(parse_config(CONFIG), previous=None)


def context(st: GatewayState, **fields: Any) -> RequestContext:
    ctx = RequestContext(
        request_id="r",
        state=st,
        method="POST",
        path="/api/generate",
        query="",
        client_ip="127.0.0.1",
    )
    ctx.status = 200
    for name, value in fields.items():
        setattr(ctx, name, value)
    return ctx


def scrape(metrics: GatewayMetrics) -> Scrape:
    return Scrape(generate_latest(metrics.registry).decode())


def test_model_labels_are_capped() -> None:
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    for i in range(MAX_MODELS + 50):
        usage = Usage(prompt_tokens=1, completion_tokens=1, model=f"model-{i}")
        metrics.observe(context(st, usage=usage))
    s = scrape(metrics)
    models = {labels["model"] for labels in s.labelsets("ollama_gateway_tokens_total")}
    assert len(models) == MAX_MODELS + 1
    assert s.value("ollama_gateway_tokens_total", model="other", kind="prompt") == 50


def test_requested_model_never_labels_tokens() -> None:
    """Only what the upstream served (its final record) may become a model label."""
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    metrics.observe(context(st, model="junk-" + "x" * 50, usage=None))
    metrics.observe(context(st, model="junk-2", usage=Usage(prompt_tokens=5, model=None)))
    assert "junk" not in scrape(metrics).text


def test_route_classes_and_methods_are_bounded() -> None:
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    for i in range(MAX_ROUTE_CLASSES + 10):
        metrics.observe(context(st, route_class=f"class-{i}", method=f"X{i}"))
    s = scrape(metrics)
    labelsets = s.labelsets("ollama_gateway_requests_total")
    assert {labels["method"] for labels in labelsets} == {"OTHER"}
    assert len({labels["route_class"] for labels in labelsets}) == MAX_ROUTE_CLASSES + 1
    assert s.value("ollama_gateway_requests_total", route_class="other") == 10


def test_user_labels_come_from_the_config_only() -> None:
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    principals = [
        Principal(user="alice", roles=frozenset({"user"}), method="basic"),
        Principal(
            user="ci-bot", roles=frozenset({"user"}), method="api_key", credential_id="ci-bot"
        ),
        Principal(user="deployer", roles=frozenset({"user"}), method="jwt"),  # named in config
        Principal(user="sub-8f3a9c", roles=frozenset({"user"}), method="jwt"),  # not in config
        None,
    ]
    for principal in principals:
        metrics.observe(context(st, principal=principal, usage=Usage(3, 4, "llama3.2")))
    s = scrape(metrics)
    users = {labels["user"] for labels in s.labelsets("ollama_gateway_requests_total")}
    assert users == {"alice", "ci-bot", "deployer", "jwt", "anonymous"}
    assert "sub-8f3a9c" not in s.text
    assert s.value("ollama_gateway_tokens_total", user="jwt", kind="completion") == 4


def test_reasons_are_labels_from_the_context_never_input() -> None:
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    metrics.observe(
        context(
            st, status=401, outcome="rejected", auth_method="basic", error_reason="bad_password"
        )
    )
    metrics.observe(context(st, status=401, outcome="rejected", auth_method="Bearer junk"))
    metrics.observe(context(st, status=429, outcome="rejected", error_reason="tokens_per_minute"))
    metrics.observe(context(st, status=502, outcome="upstream_error", error_reason="weird"))
    s = scrape(metrics)
    assert s.value("ollama_gateway_auth_failures_total", method="basic", reason="bad_password") == 1
    assert s.value("ollama_gateway_auth_failures_total", method="none", reason="unknown") == 1
    assert s.value("ollama_gateway_rate_limited_total", limit="tokens_per_minute") == 1
    assert s.value("ollama_gateway_upstream_errors_total", kind="other") == 1
    assert "junk" not in s.text


def test_tokens_per_second_from_eval_duration() -> None:
    metrics, st = GatewayMetrics(CollectorRegistry()), state()
    metrics.observe(context(st, usage=Usage(26, 10, "llama3.2", eval_seconds=2.0)))
    metrics.observe(context(st, usage=Usage(26, 10, "llama3.2", eval_seconds=None)))  # /v1
    s = scrape(metrics)
    assert s.value("ollama_gateway_generation_tokens_per_second_count", model="llama3.2") == 1
    assert s.value("ollama_gateway_generation_tokens_per_second_sum", model="llama3.2") == 5.0
    assert s.value("ollama_gateway_tokens_total", model="llama3.2", kind="prompt") == 52
