"""The image and the compose stack, for real: a Docker engine, images built here, the stack up.

The images are built with no registry: the base images from Debian's packages
(deploy/offline/base-image.sh, cached in the engine's image store between runs), the
gateway's wheels through deploy/offline/wheelhouse.sh, a plain `docker build` (no BuildKit).
Ollama is the tests' fake (tests/docker/fake-ollama.Dockerfile); Redis and Prometheus come
from Debian's packages. Every check goes through the ports the stack publishes on the host.
Under CI=true, a machine where Docker cannot run fails these tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from gateway.server import UNWIND_SECONDS
from tests.conftest import REPO, free_port
from tests.docker_support import Stack, compose_command, docker_engine, run

pytestmark = pytest.mark.docker

PROJECT = "ogw-deploytest"
GATEWAY_IMAGE = "ollama-gateway:deploytest"
FAKE_IMAGE = "ollama-gateway-fake-ollama:deploytest"
PROMETHEUS_IMAGE = "ollama-gateway-prometheus:deploytest"
SHUTDOWN_GRACE = 4  # the test's config: a full fake stream (60 chunks, 0.1 s apart) outlives it
READY_S = 120.0
JWT_SECRET = "deploy-test-" + "0123456789abcdef" * 3
REDIS_PASSWORD = "deploytest" + "ab12" * 8


def token(sub: str = "alice", roles: tuple[str, ...] = ("user",)) -> str:
    claims = {"sub": sub, "roles": list(roles), "aud": "ollama-gateway", "exp": time.time() + 600}
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


AUTH = {"Authorization": f"Bearer {token()}"}


def timed(timings: dict[str, float], name: str, *args: str | Path, **kwargs: Any) -> str:
    started = time.monotonic()
    out = run(*args, **kwargs).stdout
    timings[name] = round(time.monotonic() - started, 1)
    return out


def replace_file(path: Path, text: str) -> None:
    """As vim, `sed -i` and `git checkout` do: a new file renamed over the old one."""
    fresh = path.with_name(f".{path.name}.new")
    fresh.write_text(text)
    fresh.chmod(0o644)
    os.replace(fresh, path)


def wait_until(what: str, check: Any, deadline_s: float) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)  # polling a container's state, with a deadline


def http_status(url: str, headers: dict[str, str] | None = None, body: str | None = None) -> int:
    """The status of one request (0: no answer), its body read to the end."""
    import urllib.error
    import urllib.request

    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("deploy")
    with docker_engine(work):
        timings: dict[str, float] = {}
        base = timed(timings, "base image", REPO / "deploy/offline/base-image.sh").strip()
        tools = timed(timings, "tools image", REPO / "deploy/offline/base-image.sh", "tools")
        tools = tools.strip()
        timed(timings, "wheelhouse", REPO / "deploy/offline/wheelhouse.sh", base)
        legacy = {"DOCKER_BUILDKIT": "0"}  # the classic builder: no BuildKit-only syntax
        timed(
            timings,
            "gateway image",
            "docker", "build", "-q", "-f", REPO / "deploy/Dockerfile", "-t", GATEWAY_IMAGE,
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "PIP_OFFLINE=1", REPO,
            env=legacy,
        )  # fmt: skip
        timed(
            timings,
            "fake ollama image",
            "docker", "build", "-q", "-f", REPO / "tests/docker/fake-ollama.Dockerfile",
            "-t", FAKE_IMAGE, "--build-arg", f"GATEWAY_IMAGE={GATEWAY_IMAGE}", REPO / "tests",
            env=legacy,
        )  # fmt: skip
        timed(
            timings,
            "prometheus image",
            "docker", "build", "-q", "-f", REPO / "deploy/offline/prometheus.Dockerfile",
            "-t", PROMETHEUS_IMAGE, "--build-arg", f"TOOLS_IMAGE={tools}",
            REPO / "deploy/offline",
            env=legacy,
        )  # fmt: skip

        # The stack's config, a copy the tests may edit; secrets as files only.
        config_dir = work / "config"
        config_dir.mkdir()
        config_dir.chmod(0o755)  # the gateway's own user reads it in the container
        shipped = (REPO / "config/compose/gateway.yaml").read_text()
        assert "shutdown_grace: 30" in shipped
        replace_file(
            config_dir / "gateway.yaml",
            shipped.replace("shutdown_grace: 30", f"shutdown_grace: {SHUTDOWN_GRACE}"),
        )
        secrets = work / "secrets"
        secrets.mkdir(mode=0o700)
        for name, value in (
            ("jwt_secret", JWT_SECRET),
            ("redis_password", REDIS_PASSWORD),
            ("grafana_admin_password", "unused-here"),
        ):
            (secrets / name).write_text(value + "\n")
            (secrets / name).chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)

        gateway_port, prometheus_port = free_port(), free_port()
        env = {
            "GATEWAY_IMAGE": GATEWAY_IMAGE,
            "OLLAMA_IMAGE": FAKE_IMAGE,
            "REDIS_IMAGE": tools,
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            "GATEWAY_PUBLISH": f"127.0.0.1:{gateway_port}",
            "PROMETHEUS_PUBLISH": f"127.0.0.1:{prometheus_port}",
            "GRAFANA_PUBLISH": f"127.0.0.1:{free_port()}",
            "GATEWAY_CONFIG_DIR": str(config_dir),
            "SECRETS_DIR": str(secrets),
        }
        stack = Stack(compose_command(), PROJECT, REPO / "docker-compose.yml", env, timings)
        stack.env["GATEWAY_URL"] = f"http://127.0.0.1:{gateway_port}"
        stack.env["PROMETHEUS_URL"] = f"http://127.0.0.1:{prometheus_port}"
        stack.env["CONFIG_FILE"] = str(config_dir / "gateway.yaml")
        stack("down", "-v", "--remove-orphans", check=False)  # leftovers of a killed run
        try:
            started = time.monotonic()
            stack("up", "-d", "--no-build", "gateway", "prometheus")
            wait_until(
                "the gateway's /readyz through the published port",
                lambda: http_status(stack.env["GATEWAY_URL"] + "/readyz") == 200,
                READY_S,
            )
            timings["stack up"] = round(time.monotonic() - started, 1)
            print(f"\ndeploy test timings (s): {json.dumps(timings)}")
            yield stack
        finally:
            if os.environ.get("OGW_KEEP_STACK") != "1":
                stack("down", "-v", "--remove-orphans", check=False)


def gateway_url(stack: Stack) -> str:
    return stack.env["GATEWAY_URL"]


def access_lines(lines: list[str]) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r for r in records if r.get("log") == "access"]


async def read_stream(response: aiohttp.ClientResponse) -> list[tuple[float, dict[str, Any]]]:
    """Each NDJSON record with the time it arrived."""
    records = []
    while line := await response.content.readline():
        records.append((time.monotonic(), json.loads(line)))
    return records


# --- through the published port -------------------------------------------------------------


async def test_credentialed_stream_arrives_chunk_by_chunk(stack: Stack) -> None:
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 8}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gateway_url(stack)}/api/generate", json=body, headers=AUTH) as resp,
    ):
        assert resp.status == 200
        records = await read_stream(resp)
    assert [r["done"] for _t, r in records] == [False] * 8 + [True]
    # The fake sends a record every 0.1 s: relayed as they come, not collected.
    gaps = [b[0] - a[0] for a, b in zip(records, records[1:], strict=False)]
    assert sum(gap >= 0.05 for gap in gaps) >= 6, gaps


async def test_no_credentials_is_401_json(stack: Stack) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{gateway_url(stack)}/api/tags") as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "error" in await resp.json()


async def test_redis_holds_the_limit_keys_behind_a_password(stack: Stack) -> None:
    redis = stack.container("redis")
    body = {"model": "llama3.2", "prompt": "a long one"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{gateway_url(stack)}/api/generate", json=body, headers=AUTH) as resp,
    ):
        assert resp.status == 200
        await resp.content.readline()  # the stream holds a concurrency lease now
        keys = run(
            "docker", "exec", redis, "sh", "-c",
            'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" redis-cli --scan',
        ).stdout.split()  # fmt: skip
        await resp.read()
    assert any(k.startswith("ogw:") and "alice" in k for k in keys), keys
    # Without the password, Redis answers nothing but NOAUTH.
    anonymous = run("docker", "exec", redis, "redis-cli", "get", keys[0], check=False)
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr


def test_prometheus_scrapes_the_gateway(stack: Stack) -> None:
    import urllib.parse
    import urllib.request

    def query(promql: str) -> list[dict[str, Any]]:
        url = f"{stack.env['PROMETHEUS_URL']}/api/v1/query?query={urllib.parse.quote(promql)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
                return list(json.load(response)["data"]["result"])
        except OSError:
            return []

    assert http_status(f"{gateway_url(stack)}/api/tags") == 401  # a request to count
    up = wait_until("a scrape", lambda: query('up{job="ollama-gateway"} == 1'), 60)
    assert up[0]["metric"]["instance"] == "gateway-metrics:9464"
    # Not only up: the gateway's own series, with that request in them.
    rejected = wait_until(
        "the 401 in a scrape",
        lambda: query('ollama_gateway_requests_total{status="401",route_class="read"}'),
        60,
    )
    assert float(rejected[0]["value"][1]) >= 1


def test_config_edit_and_reload_take_effect(stack: Stack) -> None:
    config = Path(stack.env["CONFIG_FILE"])
    original = config.read_text()
    body = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 1}}

    def status() -> int:
        return http_status(f"{gateway_url(stack)}/api/generate", AUTH, json.dumps(body))

    def reloads() -> int:
        return sum("config reloaded from" in line for line in stack.logs("gateway"))

    assert status() == 200
    before = reloads()
    edited = original.replace(
        'user:\n    models: ["*"]', 'user:\n    models: ["nothing-matches-*"]'
    )
    assert edited != original
    replace_file(config, edited)  # a new inode: a single-file bind mount would not see it
    try:
        stack("kill", "-s", "HUP", "gateway")
        wait_until("the reload's log line", lambda: reloads() > before, 30)
        assert status() == 403  # llama3.2 is no longer among the role's models
    finally:
        replace_file(config, original)
        stack("kill", "-s", "HUP", "gateway")
        wait_until("the second reload", lambda: reloads() > before + 1, 30)
    assert status() == 200


# --- what is and is not reachable -----------------------------------------------------------


def host_ipv4_addresses() -> list[str]:
    out = run("ip", "-o", "-4", "addr", "show").stdout
    return re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)


def test_only_the_gateway_and_prometheus_are_published_on_loopback(stack: Stack) -> None:
    for service in ("ollama", "redis"):
        assert run("docker", "port", stack.container(service)).stdout.strip() == ""
    gateway_port = int(gateway_url(stack).rsplit(":", 1)[1])
    published = run("docker", "port", stack.container("gateway")).stdout.split()
    assert published[-1] == f"127.0.0.1:{gateway_port}", published
    # The host's own other addresses: nothing listens on that port there (local traffic).
    for address in host_ipv4_addresses():
        if address.startswith("127."):
            continue
        with pytest.raises(OSError), socket.create_connection((address, gateway_port), 2):
            pass


def test_the_host_has_no_address_on_the_backend_networks(stack: Stack) -> None:
    import ipaddress

    host = [ipaddress.ip_address(a) for a in host_ipv4_addresses()]
    for network in ("ollama", "redis", "monitoring"):
        name = f"{PROJECT}_{network}"  # compose's name for it, v1 and v2 alike
        info = json.loads(run("docker", "network", "inspect", name).stdout)[0]
        assert info["Internal"] is True, name
        subnets = [ipaddress.ip_network(c["Subnet"]) for c in info["IPAM"]["Config"]]
        assert subnets, name
        assert not [a for a in host for s in subnets if a in s], (name, subnets)


def test_ollamas_container_reaches_neither_redis_nor_the_metrics(stack: Stack) -> None:
    gateway_info = json.loads(run("docker", "inspect", stack.container("gateway")).stdout)[0]
    networks = gateway_info["NetworkSettings"]["Networks"]
    metrics_ip = next(v["IPAddress"] for k, v in networks.items() if k.endswith("_monitoring"))
    probe = """
import json, socket, sys
out = {}
for name, host, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[name] = "open"
    except OSError as exc:
        out[name] = type(exc).__name__
print(json.dumps(out))
"""
    targets = [
        ["redis", "redis", 6379],
        ["metrics by name", "gateway-metrics", 9464],
        ["metrics port", "gateway", 9464],
        # Its network's gateway address, its default route, belongs to no one (the host has
        # no address there): the packet goes nowhere and nothing answers.
        ["metrics address", metrics_ip, 9464],
        ["gateway", "gateway", 8080],
    ]
    result = run(
        "docker", "exec", stack.container("ollama"), "python3", "-c", probe, json.dumps(targets)
    )  # fmt: skip
    seen = json.loads(result.stdout)
    assert seen["gateway"] == "open"  # its one client; it still needs credentials
    assert seen["redis"] == "gaierror"  # not on its network: not even a name
    assert seen["metrics by name"] == "gaierror"
    assert seen["metrics port"] == "ConnectionRefusedError"  # bound to the monitoring address
    assert seen["metrics address"] in {"TimeoutError", "OSError"}  # unanswered or no route


# --- the image alone ---------------------------------------------------------------------


def test_docker_run_with_a_refused_config_waits_without_crash_looping(stack: Stack) -> None:
    name = f"{PROJECT}-refused"
    run("docker", "rm", "-f", name, check=False)
    run("docker", "run", "-d", "--name", name, "--restart", "on-failure", GATEWAY_IMAGE)
    try:

        def refusal() -> str:
            logs = run("docker", "logs", name).stderr
            return logs if "OLLAMA_URL is not set" in logs else ""

        logs = wait_until("the refusal in the log", refusal, 30)
        assert "GATEWAY_JWT_SECRET is not set" in logs
        container = json.loads(run("docker", "inspect", name).stdout)[0]
        assert container["State"]["Running"] is True
        assert container["RestartCount"] == 0  # waiting, not exiting and restarting
        started = time.monotonic()
        run("docker", "stop", "-t", "30", name)
        assert time.monotonic() - started < 10  # SIGTERM ends the wait at once
        state = json.loads(run("docker", "inspect", name).stdout)[0]["State"]
        assert state["ExitCode"] == 0
    finally:
        run("docker", "rm", "-f", name, check=False)


def test_docker_run_health_follows_readiness(stack: Stack) -> None:
    """The image's HEALTHCHECK command, at a test's pace: healthy only while Ollama answers."""
    name = f"{PROJECT}-run"
    secret = Path(stack.env["SECRETS_DIR"]) / "jwt_secret"
    run("docker", "rm", "-f", name, check=False)
    run(
        "docker", "run", "-d", "--name", name, "--network", f"{PROJECT}_ollama",
        "-e", "OLLAMA_URL=http://ollama:11434",
        "-e", "GATEWAY_JWT_SECRET_FILE=/run/secrets/jwt_secret",
        "-v", f"{secret}:/run/secrets/jwt_secret:ro",
        "--health-interval", "1s", "--health-start-period", "1s", "--health-retries", "2",
        GATEWAY_IMAGE,
    )  # fmt: skip

    def health() -> str:
        state = json.loads(run("docker", "inspect", name).stdout)[0]["State"]
        return str(state["Health"]["Status"])

    try:
        wait_until("healthy", lambda: health() == "healthy", 60)
        # Cut off from Ollama: still running, no longer ready, so no longer healthy.
        run("docker", "network", "disconnect", f"{PROJECT}_ollama", name)
        wait_until("unhealthy", lambda: health() == "unhealthy", 60)
        assert json.loads(run("docker", "inspect", name).stdout)[0]["State"]["Running"]
    finally:
        run("docker", "rm", "-f", name, check=False)


# --- last: stopping the stack during streams ------------------------------------------------


async def test_compose_stop_during_streams_keeps_shutdown_grace(stack: Stack) -> None:
    short = {"model": "llama3.2", "prompt": "short", "options": {"num_predict": 20}}  # ~2 s
    long = {"model": "llama3.2", "prompt": "long"}  # 60 records, ~6 s: outlives the grace
    url = f"{gateway_url(stack)}/api/generate"
    gateway = stack.container("gateway")
    async with aiohttp.ClientSession() as http:
        short_resp = await http.post(url, json=short, headers=AUTH)
        long_resp = await http.post(url, json=long, headers=AUTH)
        assert short_resp.status == long_resp.status == 200
        await short_resp.content.readline()
        await long_resp.content.readline()
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        stop = await asyncio.create_subprocess_exec(
            *stack.command("stop", "gateway"),
            env={**os.environ, **stack.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        short_records = await read_stream(short_resp)
        assert short_records[-1][1]["done"] is True  # finished during the shutdown
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_stream(long_resp)
        cut_after = loop.time() - signalled
        out, _ = await stop.communicate()
        stopped_after = loop.time() - signalled
        short_resp.release()
        long_resp.release()
    assert stop.returncode == 0, out
    assert SHUTDOWN_GRACE - 0.5 <= cut_after < SHUTDOWN_GRACE + 3, cut_after
    assert stopped_after < SHUTDOWN_GRACE + 2 * UNWIND_SECONDS + 5, stopped_after  # << 40 s
    state = json.loads(run("docker", "inspect", gateway).stdout)[0]["State"]
    assert state["ExitCode"] == 0  # not 137: SIGKILL never came
    lines = run("docker", "logs", gateway).stdout.splitlines()
    lines += run("docker", "logs", gateway).stderr.splitlines()
    generated = [a for a in access_lines(lines) if a["path"] == "/api/generate"]
    prompts = {"completed": 0, "shutdown": 0}
    for line in generated[-2:]:
        prompts[line["outcome"]] = prompts.get(line["outcome"], 0) + 1
    assert prompts == {"completed": 1, "shutdown": 1}, generated[-2:]
    assert any("no longer accepting connections" in line for line in lines)
