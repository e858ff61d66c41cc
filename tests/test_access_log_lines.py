"""The access log: one line per request with the agreed fields, never a credential or prompt."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import aiohttp
import pytest

from gateway.access_log import ACCESS_LOGGER
from gateway.logging_setup import JsonFormatter, TextFormatter
from tests.conftest import GatewayFactory
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed

SECRET_PROMPT = "TOP-SECRET-PROMPT-5d1e"
SECRET_QUERY = "QUERY-SECRET-77ab"
SECRET_TOKEN = "BEARER-SECRET-9c2f"
FIELDS = {
    "time",
    "request_id",
    "client",
    "user",
    "auth_method",
    "credential",
    "method",
    "path",
    "route_class",
    "route",
    "model",
    "status",
    "outcome",
    "reason",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "ttfb_ms",
    "queue_ms",
    "upstream",
    "gateway_ms",
    "prompt_tokens",
    "completion_tokens",
}


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.access for r in caplog.records if r.name == ACCESS_LOGGER]  # type: ignore[attr-defined]


def every_rendering(caplog: pytest.LogCaptureFixture) -> str:
    """The access records as both formatters would write them, plus their messages."""
    records = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    return "\n".join(
        f"{JsonFormatter().format(r)}\n{TextFormatter().format(r)}\n{r.getMessage()}"
        for r in records
    )


async def test_one_line_per_request_with_the_agreed_fields(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    gw = await gateway_factory({"upstream": {"url": fake.url}})
    observed = Observed(gw.app)
    sent = json.dumps({"model": "llama3.2", "prompt": SECRET_PROMPT}).encode()
    async with http.post(
        gw.url + f"/api/generate?token={SECRET_QUERY}",
        data=sent,
        headers={"Content-Type": "application/json", "X-Request-Id": "trace-abc.1"},
    ) as response:
        assert response.status == 200
        received = await response.read()
    await observed.wait(1)

    [line] = access_records(caplog)
    assert set(line) == FIELDS
    assert line["request_id"] == "trace-abc.1"
    assert line["method"] == "POST" and line["path"] == "/api/generate"
    assert line["route"] == "/api/generate" and line["upstream"] == "default"
    assert line["queue_ms"] is not None and line["queue_ms"] >= 0
    assert line["status"] == 200 and line["outcome"] == "completed"
    assert line["client"] == "127.0.0.1"
    assert line["model"] == "llama3.2"
    assert line["bytes_in"] == len(sent) and line["bytes_out"] == len(received)
    assert 0 <= line["gateway_ms"] <= line["ttfb_ms"] <= line["duration_ms"]
    assert line["time"].endswith("Z")
    rendered = every_rendering(caplog)
    assert SECRET_PROMPT not in rendered and SECRET_QUERY not in rendered
    assert "tok0" not in rendered  # nor the answer


async def test_rejected_request_logs_no_credential(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "auth": {"api_keys": [{"name": "ci-bot", "sha256": "0" * 64, "roles": ["user"]}]},
        }
    )
    for headers in ({"Authorization": f"Bearer {SECRET_TOKEN}"}, {"X-API-Key": SECRET_TOKEN}):
        async with http.get(gw.url + "/api/tags", headers=headers) as response:
            assert response.status == 401
            request_id = response.headers["X-Request-Id"]
    lines = access_records(caplog)
    assert len(lines) == 2
    assert lines[-1]["request_id"] == request_id
    assert all(line["status"] == 401 and line["outcome"] == "rejected" for line in lines)
    assert all(line["user"] is None for line in lines)
    assert SECRET_TOKEN not in every_rendering(caplog)


async def test_access_log_can_be_turned_off(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    gw = await gateway_factory({"upstream": {"url": fake.url}, "logging": {"access_log": False}})
    observed = Observed(gw.app)
    async with http.get(gw.url + "/api/version") as response:
        assert response.status == 200
    async with http.get(gw.url + "/healthz") as response:
        assert response.status == 200
    await observed.wait(2)  # both requests ended: a line would have been written by now
    assert access_records(caplog) == []


def _record(access: dict[str, Any] | None = None, **kw: Any) -> logging.LogRecord:
    record = logging.LogRecord(
        "gateway",
        logging.ERROR,
        __file__,
        1,
        kw.get("msg", "boom %s"),
        kw.get("args", ("x",)),
        kw.get("exc_info"),
    )
    if access is not None:
        record.access = access
    return record


def test_formatters_keep_hostile_values_on_one_line() -> None:
    access = {
        "time": "2026-01-01T00:00:00.000Z",
        "method": "GET",
        "path": '/api/x"\n{"forged": true}',
        "status": 200,
        "user": None,
    }
    json_line = JsonFormatter().format(_record(access))
    assert "\n" not in json_line
    assert json.loads(json_line)["path"] == access["path"]
    text_line = TextFormatter().format(_record(access))
    assert "\n" not in text_line
    assert 'path="/api/x\\"\\n{\\"forged\\": true}"' in text_line
    assert {"user=-", "status=200", "method=GET"} <= set(text_line.split())


def test_event_logs_carry_level_logger_and_exception() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        record = _record(exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "error" and entry["logger"] == "gateway"
    assert entry["message"] == "boom x"
    assert "ValueError: bad thing" in entry["exception"]
    assert TextFormatter().format(record).splitlines()[0].endswith("ERROR gateway boom x")
