"""Deployment files: docker-compose.yml, deploy/Dockerfile, the systemd unit.

Docker cannot run here, so the compose file is validated against the Compose
Specification's JSON schema (the copy vendored by the `check-jsonschema` package) plus the
structural rules the schema cannot express; the Dockerfile's healthcheck runs for real.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config import DEFAULT_SHUTDOWN_GRACE
from gateway.config_load import load_config, parse_host_port
from gateway.secure_defaults import startup_problems
from tests.conftest import REPO, GatewayFactory, require_binary, run_command
from tests.fake_ollama import FakeOllama

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
UNIT = REPO / "deploy" / "ollama-gateway.service"
DOCKER_CONFIG = REPO / "config" / "gateway.docker.yaml"
JWT_SECRET = "s" * 48


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


# --- docker-compose.yml ---------------------------------------------------------------------


def compose_validator() -> jsonschema.protocols.Validator:
    vendored = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(vendored.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    validator = compose_validator()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    # The validator is not a rubber stamp: a misspelt key is caught.
    broken = {
        **compose,
        "services": {
            **compose["services"],
            "redis": {**compose["services"]["redis"], "prots": ["6379:6379"]},
        },
    }
    assert not validator.is_valid(broken)


def test_compose_structure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"ollama", "gateway", "redis", "prometheus", "grafana"}
    assert services["ollama"]["image"].startswith("ollama/ollama")
    assert services["gateway"]["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    for name, service in services.items():
        depends = service.get("depends_on", [])
        for other in depends:
            assert other in services, f"{name} depends on unknown service {other}"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: unknown network {network}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: unknown volume {source}"
        assert "healthcheck" in service or name in {"gateway", "prometheus", "grafana"}


def test_the_gateway_is_the_only_way_in(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # Ollama has no authentication: it must never be published, nor Redis.
    assert "ports" not in services["ollama"]
    assert "ports" not in services["redis"]
    assert "expose" not in services["ollama"]
    assert services["gateway"]["ports"] == ["8080:8080"]
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} published beyond loopback: {port}"
    # Prometheus and Grafana cannot reach Ollama or Redis: different networks.
    backend_members = {n for n, s in services.items() if "backend" in s.get("networks", [])}
    assert backend_members == {"ollama", "gateway", "redis"}
    # Secrets come from the environment (.env), never from the file.
    environment = services["gateway"]["environment"]
    assert environment["GATEWAY_JWT_SECRET"].startswith("${GATEWAY_JWT_SECRET:?")
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${")


def test_compose_gateway_config_fits_the_stack(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway = compose["services"]["gateway"]
    mount = next(v for v in gateway["volumes"] if "gateway.docker.yaml" in v)
    source, target, _mode = mount.split(":")
    assert (REPO / source).resolve() == DOCKER_CONFIG
    assert target in DOCKERFILE.read_text()  # the path the image's CMD serves

    monkeypatch.setenv("GATEWAY_JWT_SECRET", JWT_SECRET)
    config = load_config(DOCKER_CONFIG)
    assert startup_problems(config) == []  # 0.0.0.0 with credentials: allowed
    assert config.upstream.url == "http://ollama:11434"
    assert config.rate_limits.store.startswith("redis://redis:")
    assert config.shutdown_grace < _seconds(gateway["stop_grace_period"])
    # Prometheus scrapes the metrics listener on the compose network.
    assert config.metrics.listen is not None
    _host, metrics_port = parse_host_port(config.metrics.listen)
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"gateway:{metrics_port}" in targets
    assert not any(str(metrics_port) in p for p in gateway["ports"])  # never published


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


# --- deploy/Dockerfile ----------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_is_slim_non_root_and_serves_the_config() -> None:
    instructions = dockerfile_instructions()
    bases = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert bases and all(re.match(r"python:3\.1[1-9]-slim\b", base) for base in bases), bases
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "[redis,uvloop]" in runs
    cmd = json.loads(next(rest for keyword, rest in instructions if keyword == "CMD"))
    assert cmd == ["ollama-gateway", "serve", "--config", "/etc/ollama-gateway/gateway.yaml"]
    # Everything the build copies survives .dockerignore.
    ignore = (REPO / ".dockerignore").read_text()
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from" not in rest:
            sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert f"!{source.split('/')[0]}" in ignore, source
                assert (REPO / source).exists() or source == "README.md", source


def healthcheck_command() -> list[str]:
    healthcheck = next(
        rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"
    )
    command = json.loads(healthcheck.split("CMD", 1)[1].strip())
    assert isinstance(command, list) and command[0] == "python"  # no curl in slim
    return [sys.executable, *command[1:]]


async def test_dockerfile_healthcheck_probes_healthz(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    gw = await gateway_factory({"upstream": {"url": fake.url}})
    command = healthcheck_command()

    async def probe(url: str) -> int:
        code, _out, _err = await run_command(*command, env={"GATEWAY_HEALTH_URL": url})
        return code

    assert await probe(f"{gw.url}/healthz") == 0
    assert await probe("http://127.0.0.1:9/healthz") != 0  # nothing there: unhealthy


# --- deploy/ollama-gateway.service --------------------------------------------------------


def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_systemd_unit_is_hardened() -> None:
    unit = unit_directives()

    def one(key: str) -> str:
        assert key in unit, f"{key} missing"
        return unit[key][-1]

    assert "serve --config /etc/ollama-gateway/gateway.yaml" in one("ExecStart")
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("KillSignal") == "SIGTERM"
    # Streams get shutdown_grace, then cancelled handlers get as long again to unwind.
    assert float(one("TimeoutStopSec")) > 2 * DEFAULT_SHUTDOWN_GRACE
    assert one("DynamicUser") == "yes" or one("User") not in {"root", "0"}
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "LockPersonality",
    ):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""  # no capabilities at all
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in unit["SystemCallFilter"]
    assert one("RestartPreventExitStatus") == "2"  # a refused config: restarting won't help


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    script = Path(sys.executable).with_name("ollama-gateway")
    assert script.exists()
    unit = tmp_path / "ollama-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/ollama-gateway/bin/ollama-gateway", str(script)))
    result = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line
        for line in result.stderr.splitlines()
        if str(unit) in line or "Unknown" in line or "Failed" in line
    ]
    assert result.returncode == 0, result.stderr
    assert problems == []


def test_commands_named_in_the_deployment_files_exist() -> None:
    import argparse

    from gateway.cli import build_parser

    text = COMPOSE.read_text() + UNIT.read_text() + DOCKER_CONFIG.read_text()
    named = set(re.findall(r"ollama-gateway ([a-z][a-z-]+)(?= --| \\$|$)", text, re.M))
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert {"serve", "token"} <= named
    assert named <= set(subparsers.choices)
