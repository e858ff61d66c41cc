"""Deployment files, read: docker-compose.yml, deploy/Dockerfile, its entrypoint, the unit.

The compose file is validated against the Compose Specification's JSON schema (Compose v2's
rules; the copy vendored by `check-jsonschema`) and by Compose v1 itself, plus the rules the
schema cannot express; the healthcheck and the entrypoint run for real. The stack itself runs
in tests/test_ops_docker.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config import DEFAULT_SHUTDOWN_GRACE
from gateway.config_load import ConfigError, load_config, parse_config, parse_host_port
from gateway.secure_defaults import startup_problems
from gateway.server import UNWIND_SECONDS
from tests.conftest import REPO, GatewayFactory, cli_env, require_binary, run_command
from tests.fake_ollama import FakeOllama

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
UNIT = REPO / "deploy" / "ollama-gateway.service"
COMPOSE_CONFIG = REPO / "config" / "compose" / "gateway.yaml"
IMAGE_CONFIG = REPO / "config" / "docker" / "gateway.yaml"
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


def test_compose_file_is_accepted_by_compose_v1(tmp_path: Path) -> None:
    """Debian 12 ships Compose v1 only: no top-level `name:`, nothing newer than it knows."""
    compose_v1 = require_binary("docker-compose")
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for name in ("jwt_secret", "redis_password", "grafana_admin_password"):
        (secrets / name).write_text("x" * 40)
    result = subprocess.run(
        [compose_v1, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SECRETS_DIR": str(secrets)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not even a warning


def test_compose_structure(compose: dict[str, Any]) -> None:
    assert set(compose) <= {"services", "networks", "volumes", "secrets"}  # no name:, version:
    services = compose["services"]
    assert set(services) == {"ollama", "gateway", "redis", "prometheus", "grafana"}
    assert services["ollama"]["image"] == "${OLLAMA_IMAGE:-ollama/ollama:latest}"
    build = services["gateway"]["build"]
    assert {build["context"], build["dockerfile"]} == {".", "deploy/Dockerfile"}
    assert set(build["args"]) == {"BASE_IMAGE", "PIP_OFFLINE"}
    for name, service in services.items():
        for other in service.get("depends_on", []):
            assert other in services, f"{name} depends on unknown service {other}"
        for network in service.get("networks", []):
            assert network in compose["networks"], f"{name}: unknown network {network}"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: unknown secret {secret}"
        for volume in service.get("volumes", []):
            source = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", split_volume(volume)[0])
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: unknown volume {source}"
        assert "healthcheck" in service or name in {"gateway", "prometheus", "grafana"}


def split_volume(volume: str) -> tuple[str, str, str]:
    """`SOURCE:TARGET[:MODE]`, where SOURCE may be `${VAR:-default}`."""
    match = re.fullmatch(r"(\$\{[^}]*\}[^:]*|[^:]+):([^:]+)(?::(\w+))?", volume)
    assert match, volume
    return match.group(1), match.group(2), match.group(3) or "rw"


def members(compose: dict[str, Any], network: str) -> set[str]:
    return {n for n, s in compose["services"].items() if network in s.get("networks", [])}


def test_the_gateway_is_the_only_way_in(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # Ollama has no authentication: never published, nor Redis.
    for name in ("ollama", "redis"):
        assert "ports" not in services[name] and "expose" not in services[name], name
    # Published ports default to the host's loopback (a TLS proxy on the host serves others).
    for name in ("gateway", "prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert re.fullmatch(r"\$\{[A-Z_]+_PUBLISH:-127\.0\.0\.1:\d+\}:\d+", port), port
    # One internal network per backend; the host gets no address on them.
    networks = compose["networks"]
    for name in ("ollama", "redis", "monitoring"):
        assert networks[name]["internal"] is True, name
        assert networks[name]["driver_opts"] == {"com.docker.network.bridge.inhibit_ipv4": "true"}
    assert members(compose, "ollama") == {"ollama", "gateway"}
    assert members(compose, "redis") == {"redis", "gateway"}
    assert members(compose, "monitoring") == {"gateway", "prometheus", "grafana"}
    assert services["ollama"]["networks"] == ["ollama"]
    assert services["redis"]["networks"] == ["redis"]


def test_secrets_are_files_never_environment_values(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if re.search(r"SECRET|PASSWORD|TOKEN", key):
                assert key.endswith("_FILE") or key.endswith("__FILE"), (name, key)
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in service["secrets"], (name, key)
    for secret in compose["secrets"].values():
        assert secret["file"].startswith("${SECRETS_DIR:-./secrets}/")
    # Redis takes its password from the secret, on stdin: never on a command line.
    redis = services["redis"]
    script = redis["command"][-1]
    assert "requirepass $$(cat /run/secrets/redis_password)" in script
    assert "redis-server -" in script
    assert "redis_password" in redis["healthcheck"]["test"][-1]
    # ./secrets/ holds real secrets on a deployment host: never committed.
    assert "secrets/" in (REPO / ".gitignore").read_text().splitlines()


def test_compose_gateway_config_fits_the_stack(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gateway = compose["services"]["gateway"]
    (mount,) = gateway["volumes"]
    source, target, mode = split_volume(mount)
    # The directory is mounted, not the file: a replaced file is seen on reload.
    assert source == "${GATEWAY_CONFIG_DIR:-./config/compose}" and mode == "ro"
    assert target == "/etc/ollama-gateway"
    assert gateway["environment"]["OLLAMA_GATEWAY_CONFIG"] == f"{target}/gateway.yaml"

    for variable in ("GATEWAY_JWT_SECRET", "REDIS_PASSWORD"):
        file = tmp_path / variable
        file.write_text("0123456789abcdef" * 3 + "\n")
        assert gateway["environment"][f"{variable}_FILE"].startswith("/run/secrets/")
        monkeypatch.setenv(f"{variable}_FILE", str(file))
    config = load_config(COMPOSE_CONFIG)
    assert startup_problems(config) == []  # 0.0.0.0 with credentials: allowed
    assert config.upstream.url == "http://ollama:11434"
    assert config.rate_limits.store.startswith("redis://:0123456789abcdef")
    assert config.rate_limits.store.endswith("@redis:6379/0")
    # compose's stop timeout covers the grace and the unwinding after it, with room to spare.
    needed = config.shutdown_grace + 2 * UNWIND_SECONDS
    assert needed < _seconds(gateway["stop_grace_period"]) <= needed + 10
    # Metrics: bound to the gateway's name on the monitoring network, scraped there.
    assert config.metrics.listen is not None
    metrics_host, metrics_port = parse_host_port(config.metrics.listen)
    assert gateway["networks"]["monitoring"] == {"aliases": [metrics_host]}
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"{metrics_host}:{metrics_port}" in targets
    assert not any(str(metrics_port) in p for p in gateway["ports"])  # never published


def test_image_default_config_needs_ollama_url_and_secret(tmp_path: Path) -> None:
    env = {"OLLAMA_URL": "http://ollama:11434", "GATEWAY_JWT_SECRET": JWT_SECRET}
    config = parse_config(IMAGE_CONFIG.read_text(), env=env)
    assert startup_problems(config) == []
    assert config.listen == "0.0.0.0:8080"
    with pytest.raises(ConfigError) as refused:
        parse_config(IMAGE_CONFIG.read_text(), env={})
    assert {p.path for p in refused.value.problems} == {"upstream.url", "auth.jwt.secret"}


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


def test_dockerfile_builds_without_buildkit() -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)  # no remote frontend
    for keyword, rest in dockerfile_instructions():
        assert "--mount" not in rest and "--chmod" not in rest, (keyword, rest)  # BuildKit-only
        assert "<<" not in rest, (keyword, rest)  # heredocs: BuildKit-only


def test_dockerfile_is_non_root_and_serves_the_config() -> None:
    instructions = dockerfile_instructions()
    args = [rest for keyword, rest in instructions if keyword == "ARG"]
    assert re.fullmatch(r"BASE_IMAGE=python:3\.1[1-9]-slim", args[0]), args
    bases = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert bases == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "[redis,uvloop]" in runs and "--find-links /wheelhouse" in runs
    entrypoint = json.loads(next(rest for keyword, rest in instructions if keyword == "ENTRYPOINT"))
    assert entrypoint == ["/usr/local/bin/ollama-gateway-entrypoint"]
    assert json.loads(next(rest for keyword, rest in instructions if keyword == "CMD")) == ["serve"]
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert "OLLAMA_GATEWAY_CONFIG=/etc/ollama-gateway/gateway.yaml" in env
    # Everything the build copies survives .dockerignore.
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from" not in rest:
            for source in rest.split()[:-1]:
                kept = [line[1:] for line in ignore if line.startswith("!")]
                assert any(source.startswith(k.rstrip("/")) for k in kept), source
                assert (REPO / source).exists(), source


def healthcheck_command() -> list[str]:
    healthcheck = next(
        rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"
    )
    command = json.loads(healthcheck.split("CMD", 1)[1].strip())
    assert isinstance(command, list) and command[0] == "python3"  # no curl in slim images
    return [sys.executable, *command[1:]]


async def test_dockerfile_healthcheck_is_readiness(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    assert "GATEWAY_HEALTH_URL=http://127.0.0.1:8080/readyz" in DOCKERFILE.read_text()
    up = await gateway_factory({"upstream": {"url": fake.url}})
    cut_off = await gateway_factory({"upstream": {"url": "http://127.0.0.1:9"}})
    command = healthcheck_command()

    async def probe(url: str) -> int:
        code, _out, _err = await run_command(*command, env={"GATEWAY_HEALTH_URL": url})
        return code

    assert await probe(f"{up.url}/readyz") == 0
    assert await probe(f"{cut_off.url}/readyz") != 0  # serving, but cannot reach Ollama
    assert await probe("http://127.0.0.1:9/readyz") != 0  # nothing there


async def test_entrypoint_waits_on_a_refused_config_then_serves(
    tmp_path: Path, fake: FakeOllama
) -> None:
    """The image's entrypoint, run here: no crash loop, the fix is picked up, SIGTERM works."""
    config = tmp_path / "gateway.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nupstream: {{url: '{fake.url}'}}\nroutes: 1\n")
    env = cli_env(
        OLLAMA_GATEWAY_CONFIG=str(config),
        GATEWAY_RECHECK_SECONDS="0.2",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    process = await asyncio.create_subprocess_exec(
        "sh",
        str(REPO / "deploy" / "docker-entrypoint.sh"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None and process.stdout is not None
    try:
        first = await asyncio.wait_for(process.stderr.readline(), 30)
        assert b"waiting for a fixed config" in first
        assert b"routes" in await asyncio.wait_for(process.stderr.readline(), 30)
        assert process.returncode is None  # waiting, not exiting (a restart policy would loop)
        config.write_text(f"listen: 127.0.0.1:0\nupstream: {{url: '{fake.url}'}}\n")
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"ollama-gateway listening on http://127.0.0.1:" in line  # exec'd the server
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_entrypoint_exits_at_once_on_sigterm_while_waiting(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("routes: 1\n")
    env = cli_env(
        OLLAMA_GATEWAY_CONFIG=str(config),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    process = await asyncio.create_subprocess_exec(
        "sh",
        str(REPO / "deploy" / "docker-entrypoint.sh"),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    assert b"waiting" in await asyncio.wait_for(process.stderr.readline(), 30)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 5) == 0  # not after the 5 s re-check


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
    # Streams get shutdown_grace, then what is cut gets a moment to unwind: room for both.
    needed = DEFAULT_SHUTDOWN_GRACE + 2 * UNWIND_SECONDS
    assert needed < float(one("TimeoutStopSec")) <= needed + 15
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

    text = COMPOSE.read_text() + UNIT.read_text() + COMPOSE_CONFIG.read_text()
    text += IMAGE_CONFIG.read_text() + DOCKERFILE.read_text()
    named = set(re.findall(r"ollama-gateway ([a-z][a-z-]+)(?= --| \\$|$)", text, re.M))
    subparsers = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert {"serve", "token"} <= named
    assert named <= set(subparsers.choices)
