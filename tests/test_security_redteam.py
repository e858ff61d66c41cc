"""Red-team regressions: attacks tried over real sockets, one test per attack.

Each test asserts the attack fails and, where a forbidden call was at stake, that the fake
Ollama never saw it (`fake.requests`). Spellings and framings already covered by
test_policy_bypass.py and test_auth_*.py are not repeated here.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import io
import json
import logging
import re
import resource
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.cli import main as cli_main
from gateway.config_load import ConfigError, parse_config
from gateway.metrics_http import start_metrics_listener
from gateway.server import reload_config
from tests.auth_support import authenticator
from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama
from tests.metrics_support import Observed
from tests.policy_support import ALICE_KEY, ROOT_KEY, basic, policy_config, request_bytes

ALICE, BOB, CAROL = basic("alice"), basic("bob"), basic("carol")  # bob: qwen* only
CLOUD = "gpt-oss:120b-cloud"  # needs a glob naming "cloud": nobody here has one
JSON = {"Content-Type": "application/json"}
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


@pytest.fixture
async def locked(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    return await gateway_factory(policy_config(fake.url))


def auth_line(headers: dict[str, str]) -> bytes:
    return b"Authorization: " + headers["Authorization"].encode()


async def exchange(host_port: str, payload: bytes, *, wait_s: float = 5.0) -> bytes:
    """Raw bytes in; every byte the gateway sends until it closes (or `wait_s` passes)."""
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    data = b""
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return data


def statuses(data: bytes) -> list[int]:
    return [int(s) for s in STATUS.findall(data)]


async def send(
    http: aiohttp.ClientSession, method: str, url: str, **kw: Any
) -> tuple[int, str, bytes]:
    async with http.request(method, url, **kw) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


# --- paths, methods, framing -------------------------------------------------------------

ODD_TARGETS = [
    b"/v1/%c0%ae%c0%ae/api/pull",  # overlong UTF-8 dots
    b"/v1%c0%af..%c0%afapi%c0%afpull",  # overlong UTF-8 slashes
    b"/v1/%252e%252e/api/pull",  # double-encoded dots
    b"/API%2fPULL",  # escaped slash, upper-case route
    b"/api%5c%70ull",  # escaped backslash
    b"/api/%ef%bc%8fpull",  # fullwidth solidus
    b"/api/pull/.",
    b"/api/pull/%2e",
    b"/api/pu%u006cl",  # IIS-style %u escapes
    b"//127.0.0.1:11434/api/pull",
]


@pytest.mark.parametrize("target", ODD_TARGETS, ids=lambda t: t.decode("latin-1"))
async def test_more_spellings_of_an_admin_route(
    locked: RunningGateway, fake: FakeOllama, target: bytes
) -> None:
    payload = request_bytes("POST", target, headers={**ALICE, **JSON}, body=b'{"model":"x"}')
    assert statuses(await exchange(locked.host_port, payload)) in ([400], [403])
    assert fake.requests == []


@pytest.mark.parametrize(
    "request_line",
    [
        b"CONNECT 127.0.0.1:11434 HTTP/1.1",
        b"CONNECT /api/pull HTTP/1.1",
        b"TRACE /api/tags HTTP/1.1",
        b"OPTIONS /api/pull HTTP/1.1",  # not a preflight: no Origin
        b"OPTIONS * HTTP/1.1",
    ],
)
async def test_connect_trace_and_options_are_never_relayed(
    locked: RunningGateway, fake: FakeOllama, request_line: bytes
) -> None:
    payload = (
        request_line + b"\r\nHost: g\r\n" + auth_line(ALICE) + b"\r\nConnection: close\r\n\r\n"
    )
    got = statuses(await exchange(locked.host_port, payload, wait_s=2))
    assert got[:1] in ([400], [403])
    assert fake.requests == []


async def test_http10_and_pipelining_are_judged_request_by_request(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    gw = await gateway_factory(policy_config(fake.url))
    auth = auth_line(BOB)

    def chat(model: str, version: bytes) -> bytes:
        body = json.dumps({"model": model, "messages": [], "stream": False}).encode()
        return (
            b"POST /api/chat " + version + b"\r\nHost: g\r\n" + auth + b"\r\nConnection: keep-alive"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )

    pull = b"POST /api/pull HTTP/1.0\r\n" + auth + b"\r\nContent-Length: 2\r\n\r\n{}"
    payload = chat("qwen2.5:7b", b"HTTP/1.0") + chat("llama3.2", b"HTTP/1.1") + pull
    assert statuses(await exchange(gw.host_port, payload)) == [200, 403, 403]
    assert [(r.path, r.json["model"]) for r in fake.requests] == [("/api/chat", "qwen2.5:7b")]


PULL = b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 2\r\n\r\n{}"
CHAT = b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\n"
AMBIGUOUS_FRAMING = {
    "bare-lf-lines": b"POST /api/chat HTTP/1.1\nHost: g\nAUTH\nContent-Length: 2\n\n{}" + PULL,
    "bare-lf-after-chunk": CHAT + b"Transfer-Encoding: chunked\r\n\r\n2\n{}\r\n0\r\n\r\n" + PULL,
    "bare-cr": b"POST /api/chat HTTP/1.1\rHost: g\r\nAUTH\r\n\r\n" + PULL,
    "chunk-extension-lf": CHAT + b"Transfer-Encoding: chunked\r\n\r\n2;\nxx\r\n0\r\n\r\n" + PULL,
    "chunk-extension-quoted-crlf": (
        CHAT + b'Transfer-Encoding: chunked\r\n\r\n2;a="\r\n"\r\n{}\r\n0\r\n\r\n' + PULL
    ),
    "chunk-size-nul": CHAT + b"Transfer-Encoding: chunked\r\n\r\n2\x00\r\n{}\r\n0\r\n\r\n" + PULL,
    "te-value-folded": (
        CHAT + b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n" + PULL
    ),
    "te-xchunked": CHAT
    + b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
    + PULL,
    "te-trailing-comma": CHAT + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n" + PULL,
    "te-on-http10": (
        b"POST /api/chat HTTP/1.0\r\nAUTH\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + PULL
    ),
    "cl-list": CHAT + b"Content-Length: 2, 2\r\n\r\n{}" + PULL,
    "cl-twice-same": CHAT + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}" + PULL,
    "cl-hex": CHAT + b"Content-Length: 0x2\r\n\r\n{}" + PULL,
    "space-before-colon": CHAT + b"Content-Length : 2\r\n\r\n{}" + PULL,
}


@pytest.mark.parametrize("name", list(AMBIGUOUS_FRAMING))
async def test_ambiguous_framing_is_400_and_nothing_is_forwarded(
    locked: RunningGateway, fake: FakeOllama, name: str
) -> None:
    payload = AMBIGUOUS_FRAMING[name].replace(b"AUTH", auth_line(ALICE))
    assert statuses(await exchange(locked.host_port, payload, wait_s=3)) == [400]
    assert fake.requests == []


@pytest.mark.parametrize(
    "header",
    [
        b"X-Request-Id: abc\rSet-Cookie: stolen=1",
        b"X-Request-Id: abc\r\n Set-Cookie: stolen=1",
        b"X-Request-Id: abc%0d%0aSet-Cookie:%20stolen=1",
        b"X-Request-Id: abc\xe2\x80\xa8Set-Cookie: stolen=1",
        b"X-Request-Id: abc\x00Set-Cookie: stolen=1",
    ],
)
async def test_no_response_header_injection_through_x_request_id(
    locked: RunningGateway, fake: FakeOllama, header: bytes
) -> None:
    payload = (
        b"GET /api/tags HTTP/1.1\r\nHost: g\r\n"
        + auth_line(ALICE)
        + b"\r\n"
        + header
        + b"\r\nConnection: close\r\n\r\n"
    )
    data = await exchange(locked.host_port, payload)
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert statuses(data) in ([200], [400])
    assert b"set-cookie" not in head
    for line in head.split(b"\r\n"):
        if line.startswith(b"x-request-id:"):
            assert re.fullmatch(rb"x-request-id: [a-z0-9._:-]{1,128}", line), line
    assert all("stolen" not in "".join(r.headers.values()) for r in fake.requests)


MALFORMED = {  # name: (raw request, the secret it carries)
    "bare-lf": (
        b"GET /api/tags HTTP/1.1\nHost: g\nAuthorization: Basic YWxpY2U6U2VjcmV0UHc=\n\n",
        "YWxpY2U6U2VjcmV0UHc=",
    ),
    "control-char": (
        b"GET /api/tags HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer sk-LeakMe-1\x01\r\n\r\n",
        "sk-LeakMe-1",
    ),
    "64k-header": (
        b"GET /api/tags HTTP/1.1\r\nHost: g\r\nAuthorization: Basic "
        + b"QmlnU2VjcmV0" * 5462
        + b"\r\n\r\n",
        "QmlnU2VjcmV0",
    ),
    "huge-jwt": (
        b"GET /api/tags HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer eyJh."
        + b"TGVha01l" * 2500
        + b".sig\r\n\r\n",
        "TGVha01l",
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_http_is_refused_and_its_bytes_never_logged(
    locked: RunningGateway,
    fake: FakeOllama,
    caplog: pytest.LogCaptureFixture,
    name: str,
) -> None:
    payload, secret = MALFORMED[name]
    caplog.set_level(logging.DEBUG)
    # aiohttp's parser answers these itself (plain text, before the pipeline: see
    # docs/operations.md); what matters is that nothing is forwarded or logged.
    assert statuses(await exchange(locked.host_port, payload)) == [400]
    assert fake.requests == []
    assert "malformed request refused with 400" in caplog.text
    assert secret not in caplog.text


async def test_slow_headers_are_cut_off_and_idle_connections_closed(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory({**policy_config(fake.url), "client_idle_timeout": 0.5})
    host, port = gw.host_port.split(":")
    head = b"GET /api/tags HTTP/1.1\r\nHost: g\r\n" + auth_line(ALICE) + b"\r\nX-Pad: " + b"a" * 500

    async def slowloris() -> tuple[str, int]:
        """One byte every 50 ms: never a whole header block (bounded: 5 s at most)."""
        reader, writer = await asyncio.open_connection(host, int(port))
        sent = 0
        try:
            async with asyncio.timeout(5):
                while True:
                    writer.write(head[sent : sent + 1])
                    sent += 1
                    await writer.drain()
                    try:
                        if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                            return "closed", sent
                    except TimeoutError:
                        continue
        except (ConnectionResetError, BrokenPipeError):
            return "closed", sent
        except TimeoutError:
            return "still open", sent
        finally:
            writer.close()

    attackers = [asyncio.create_task(slowloris()) for _ in range(30)]
    # Meanwhile a real client is served at once.
    status, _, _ = await send(http, "GET", gw.url + "/api/tags", headers=ALICE)
    assert status == 200
    results = await asyncio.gather(*attackers)
    assert all(state == "closed" and sent < len(head) for state, sent in results), results
    # A keep-alive connection left idle is closed too.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_bytes("GET", "/api/version", close=False))
    await writer.drain()
    async with asyncio.timeout(5):
        assert statuses(await reader.readuntil(b"\r\n\r\n")) == [200]
        assert b'"version"' in await reader.readuntil(b"}")
        assert await reader.read(1) == b""  # closed by the gateway, not by us
    writer.close()
    assert [r.path for r in fake.requests] == ["/api/tags", "/api/version"]


async def test_the_metrics_listener_cuts_off_slow_headers_too(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    gw = await gateway_factory({**policy_config(fake.url), "client_idle_timeout": 0.5})
    runner = await start_metrics_listener(gw.app, "127.0.0.1:0")
    try:
        host, port = runner.addresses[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: g\r\nX-Pad: aaaa")  # and no more
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the gateway
        writer.close()
    finally:
        await runner.cleanup()


def test_client_idle_timeout_cannot_turn_the_bound_off() -> None:
    for value in (0, -1):
        with pytest.raises(ConfigError, match="client_idle_timeout"):
            parse_config(f"client_idle_timeout: {value}")


async def test_many_idle_connections_do_not_starve_a_real_client(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    host, port = locked.host_port.split(":")
    held = [await asyncio.open_connection(host, int(port)) for _ in range(300)]
    try:
        async with asyncio.timeout(5):
            status, _, _ = await send(http, "GET", locked.url + "/api/tags", headers=ALICE)
        assert status == 200
    finally:
        for _, writer in held:
            writer.close()
    assert [r.path for r in fake.requests] == ["/api/tags"]


# --- credentials --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_empty_secret(claims: dict[str, Any], kid: str) -> str:
    signing_input = b64url(json.dumps({"alg": "HS256", "kid": kid}).encode()) + "."
    signing_input += b64url(json.dumps(claims).encode())
    signature = hmac.new(b"", signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned_with_header(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token pyjwt refuses to make (a `kid` that is not a string)."""
    parts = (json.dumps(header).encode(), json.dumps(claims).encode(), b"signature")
    return ".".join(b64url(part) for part in parts)


async def test_jwt_kid_and_embedded_key_tricks(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    rsa_pair: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server_key, attacker_key = rsa_pair
    pem = tmp_path / "issuer.pem"
    pem.write_bytes(
        server_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "auth": {"jwt": {"algorithms": ["RS256"], "public_key": str(pem)}},
        }
    )
    now = int(time.time())
    claims = {"sub": "mallory", "roles": ["admin"], "exp": now + 300}
    attacker_jwk = json.loads(RSAAlgorithm.to_jwk(attacker_key.public_key()))
    forged = [
        # The attacker's own key shipped in the header (jwk/jku/x5u): never trusted.
        jwt.encode(claims, attacker_key, "RS256", headers={"jwk": attacker_jwk}),
        jwt.encode(claims, attacker_key, "RS256", headers={"jku": "http://127.0.0.1:1/k"}),
        jwt.encode(claims, attacker_key, "RS256", headers={"x5u": "http://127.0.0.1:1/c"}),
        # kid path traversal / injection: kid selects nothing without a JWKS.
        jwt.encode(claims, attacker_key, "RS256", headers={"kid": "../../../../dev/null"}),
        jwt.encode(claims, attacker_key, "RS256", headers={"kid": "' OR '1'='1"}),
        hs256_with_empty_secret(claims, kid="/dev/null"),  # "the key file is empty"
        unsigned_with_header({"alg": "RS256", "kid": {"$ne": None}}, claims),
    ]
    for token in forged:
        async with http.post(
            gw.url + "/api/pull", json={"model": "x"}, headers={"Authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 401, token
            assert (await r.json()) == {"error": "invalid token"}
    assert fake.requests == []
    for token in forged:
        assert token.rsplit(".", 1)[1] not in caplog.text  # no signature (or token) logged
    good = jwt.encode(claims, server_key, "RS256", headers={"kid": "../../../../dev/null"})
    async with http.get(gw.url + "/api/tags", headers={"Authorization": f"Bearer {good}"}) as r:
        assert r.status == 200  # the configured key verifies, whatever kid says


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("missing-padding", "Basic " + base64.b64encode(b"alice:pw").decode().rstrip("=")),
        ("urlsafe-alphabet", "Basic " + base64.urlsafe_b64encode(b"alice:pw?>").decode()),
        ("nul-after-password", "Basic " + base64.b64encode(b"alice:pw\x00").decode()),
        ("colon-only", "Basic " + base64.b64encode(b":").decode()),
        ("latin1-user", "Basic " + base64.b64encode("\xe1lice:pw".encode("latin-1")).decode()),
        ("huge-password", "Basic " + base64.b64encode(b"alice:" + b"p" * 4000).decode()),
        ("token68-junk", "Basic YWxp Y2U6cHc="),
    ],
)
async def test_basic_header_tricks(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession, name: str, value: str
) -> None:
    status, ctype, body = await send(
        http,
        "POST",
        locked.url + "/api/chat",
        data=b'{"model":"llama3.2"}',
        headers={"Authorization": value},
    )
    assert (status, ctype) == (401, "application/json") and b"error" in body
    assert fake.requests == []
    if name == "huge-password":  # refused before any hash is spent (CPU exhaustion)
        assert authenticator(locked).basic.verifications == 0


@pytest.mark.parametrize(
    "key",
    [
        ALICE_KEY[:-1],
        ALICE_KEY + "0",
        ALICE_KEY.upper(),
        " " + ALICE_KEY + "\t",  # stripped by HTTP itself: still the key, so it must work
        ALICE_KEY + " " + ALICE_KEY,
        "x" * 8000,
        hashlib.sha256(ALICE_KEY.encode()).hexdigest(),  # the stored hash is not the key
    ],
)
async def test_api_key_length_and_shape_tricks(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession, key: str
) -> None:
    status, _, _ = await send(http, "GET", locked.url + "/api/tags", headers={"X-API-Key": key})
    if key.strip() == ALICE_KEY:
        assert status == 200
        assert "X-API-Key" not in fake.requests[0].headers
    else:
        assert status == 401
        assert fake.requests == []


@pytest.mark.parametrize(
    "headers",
    [
        [("X-API-Key", ROOT_KEY), ("Authorization", ALICE["Authorization"])],
        [("Authorization", f"Bearer {ALICE_KEY}"), ("X-API-Key", ROOT_KEY)],
        [("Authorization", f"Bearer {ROOT_KEY}"), ("Authorization", ALICE["Authorization"])],
        [("X-API-Key", ALICE_KEY), ("X-API-Key", ROOT_KEY)],
        [("Authorization", f"Bearer {ROOT_KEY}, Basic {ALICE['Authorization'][6:]}")],
    ],
)
async def test_two_credentials_never_mix_principals(
    locked: RunningGateway, fake: FakeOllama, headers: list[tuple[str, str]]
) -> None:
    lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    payload = (
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\n"
        + lines
        + b"Content-Length: 13\r\nConnection: close\r\n\r\n"
        + b'{"model":"x"}'
    )
    assert statuses(await exchange(locked.host_port, payload)) == [401]
    assert fake.requests == []


async def test_lockout_ignores_rotated_forwarded_for_without_trusted_proxies(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    config = policy_config(fake.url)
    config["auth"]["lockout"] = {"max_failures": 3, "window": 60, "block_seconds": 60}
    gw = await gateway_factory(config)
    got = []
    for i in range(5):
        forged = {"X-Forwarded-For": f"198.51.100.{i}", "X-Real-IP": f"203.0.113.{i}"}
        status, _, _ = await send(
            http, "GET", gw.url + "/api/tags", headers={**basic("alice", f"guess{i}"), **forged}
        )
        got.append(status)
    assert got == [401, 401, 401, 429, 429]  # one address, whatever the headers claim
    status, _, _ = await send(
        http, "GET", gw.url + "/api/tags", headers={**ALICE, "X-Forwarded-For": "192.0.2.1"}
    )
    assert status == 429  # even the right password, from a "new" address
    assert fake.requests == []


async def test_rotating_junk_credentials_resets_nothing(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    config = policy_config(fake.url)
    config["roles"] = {
        "user": {"models": ["*"], "limits": {"requests_per_minute": 60, "burst": 1}},
        "admin": {"models": ["*"]},
    }
    config["auth"]["users"] = {k: v for k, v in config["auth"]["users"].items() if k == "alice"}
    config["auth"]["api_keys"] = [config["auth"]["api_keys"][0]]
    gw = await gateway_factory(config)
    assert (await send(http, "GET", gw.url + "/api/tags", headers=ALICE))[0] == 200
    assert (await send(http, "GET", gw.url + "/api/tags", headers=ALICE))[0] == 429
    for i in range(4):  # junk values never get a fresh quota: they are not a principal
        junk = {"Authorization": f"Bearer junk-{i}-{'z' * i}"}
        assert (await send(http, "GET", gw.url + "/api/tags", headers=junk))[0] == 401
    assert (await send(http, "GET", gw.url + "/api/tags", headers=ALICE))[0] == 429
    assert len(fake.requests) == 1


# --- model allow-lists and bodies ---------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"model":"qwen2.5:7b","name":"llama3.2"}', 403),
        (b'{"name":"llama3.2","model":"qwen2.5:7b"}', 403),
        (b'{"model":"qwen2.5:7b","Model":"llama3.2"}', 403),
        (b'{"model":"qwen2.5:7b","MODEL":"llama3.2","model":"qwen2.5:7b"}', 403),
        (b'{"mod\\u0065l":"llama3.2"}', 403),  # an escaped key is still `model`
        (b'{"model":"LLAMA3.2"}', 403),
        (b'{"model":"llama3.2:latest"}', 403),
        (b'{"model":"library/llama3.2"}', 403),
        (b'{"model":"registry.ollama.ai/library/llama3.2:latest"}', 403),
        (b'{"model":"llama3.2 "}', 400),
        (b'{"model":" qwen2.5:7b"}', 400),
        (b'{"model":"qwen2.5:7b\\u0000llama3.2"}', 400),
        ('{"model":"\uff51wen2.5:7b"}'.encode(), 400),  # fullwidth q
        ('{"model":"q\u0435n"}'.encode(), 400),  # Cyrillic e
        (b'{"model":["qwen2.5:7b","llama3.2"]}', 400),
        (b'{"model":{"name":"llama3.2"}}', 400),
        (b'{"model":true}', 400),
        (b'{"model":7}', 400),
    ],
)
async def test_model_allow_list_bypasses(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession, body: bytes, status: int
) -> None:
    got, ctype, answer = await send(
        http, "POST", locked.url + "/api/chat", data=body, headers={**BOB, **JSON}
    )
    assert (got, ctype) == (status, "application/json") and b'"error"' in answer
    assert fake.requests == []


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"llama3.2","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"model":"llama3.2","x":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        # Over 1 MiB: parsed off the event loop, in a thread with its own stack.
        b'{"model":"llama3.2","x":' + b"[" * 700_000 + b"]" * 700_000 + b"}",
        b'{"model":"llama3.2","n":' + b"9" * 5000 + b"}",
        b'{"model":"llama3.2","n":-' + b"1" * 100_000 + b"}",
    ],
    ids=["arrays-100k", "objects-50k", "arrays-700k-threaded", "int-5000-digits", "int-100k"],
)
async def test_deep_nesting_and_huge_numbers_are_400_never_500(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession, body: bytes
) -> None:
    gw = await gateway_factory(policy_config(fake.url, max_body_bytes=4 << 20))
    status, ctype, answer = await send(
        http, "POST", gw.url + "/api/chat", data=io.BytesIO(body), headers={**ALICE, **JSON}
    )
    assert (status, ctype) == (400, "application/json")
    assert json.loads(answer) == {"error": "request body is not valid JSON"}
    assert fake.requests == []


def gigabyte_of_zeros(coding: str) -> bytes:
    """1 GiB of zeros, compressed to about a megabyte (1024 concatenated members/frames)."""
    mib = b"\0" * (1 << 20)
    if coding == "gzip":
        member = gzip.compress(mib, 9)
    elif coding == "zstd":
        member = zstandard.ZstdCompressor(level=19).compress(mib)
    else:  # deflate: one raw stream; after a full flush every 1 MiB block compresses alike
        stream = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        first = stream.compress(mib) + stream.flush(zlib.Z_FULL_FLUSH)
        again = stream.compress(mib) + stream.flush(zlib.Z_FULL_FLUSH)
        return first + again * 1023 + stream.flush()
    return member * 1024


@pytest.mark.parametrize("coding", ["gzip", "zstd", "deflate"])
async def test_compression_bombs_stop_at_the_body_limit(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession, coding: str
) -> None:
    gw = await gateway_factory(policy_config(fake.url, max_body_bytes=4 << 20))
    bomb = gigabyte_of_zeros(coding)
    assert len(bomb) < 4 << 20  # small enough to be read: only the inflated copy is too big
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    status, ctype, answer = await send(
        http,
        "POST",
        gw.url + "/v1/responses",
        data=io.BytesIO(bomb),
        headers={**ALICE, **JSON, "Content-Encoding": coding},
    )
    assert (status, ctype) == (413, "application/json")
    assert json.loads(answer) == {"error": "request body too large"}
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 * 1024
    assert fake.requests == []


async def test_huge_json_body_is_refused_before_it_is_sent(
    locked: RunningGateway, fake: FakeOllama
) -> None:
    host, port = locked.host_port.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\n"
        + auth_line(ALICE)
        + b'\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{"model":'
    )
    await writer.drain()
    async with asyncio.timeout(5):  # answered with 10 GB still unsent
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert statuses(head) == [413]
    assert fake.requests == []


def form(*parts: tuple[str, str], boundary: str = "B") -> bytes:
    body = "".join(f"--{boundary}\r\n{headers}\r\n\r\n{value}\r\n" for headers, value in parts)
    return (body + f"--{boundary}--\r\n").encode()


def field(name: str, extra: str = "") -> str:
    return f'Content-Disposition: form-data; name="{name}"{extra}'


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("B", form((field("model"), "llama3.2"), (field("model"), CLOUD)), 403),
        ("B", form((field("model", '; filename="a"'), CLOUD), (field("model"), "llama3.2")), 403),
        ("B", form((field("Model"), CLOUD), (field("model"), "llama3.2")), 403),
        ("B", b"preamble\r\n" + form((field("model"), CLOUD)), 400),
        ('"B"; boundary=C', form((field("model"), CLOUD)), 400),
        ("C", form((field("model"), CLOUD)), 400),  # the body's boundary is not the header's
        ("B", form(("Content-Disposition: form-data; name*=utf-8''model", CLOUD)), 400),
        ("B", form((field("model") + "\r\nContent-Disposition: form-data; name=x", CLOUD)), 400),
        ("B", form((field("model"), CLOUD)).replace(b"\r\n", b"\n"), 400),
    ],
)
async def test_multipart_tricks_on_transcriptions(
    locked: RunningGateway,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    content_type: str,
    body: bytes,
    status: int,
) -> None:
    headers = {**ALICE, "Content-Type": f"multipart/form-data; boundary={content_type}"}
    got, ctype, _ = await send(
        http, "POST", locked.url + "/v1/audio/transcriptions", data=body, headers=headers
    )
    assert (got, ctype) == (status, "application/json")
    assert fake.requests == []


@pytest.mark.parametrize(
    ("who", "method", "path", "body"),
    [
        (BOB, "GET", "/v1/models/LLAMA3.2", None),
        (BOB, "GET", "/v1/models/llama3.2%3Alatest", None),
        (BOB, "GET", "/V1/Models/registry.ollama.ai/library/llama3.2", None),
        (ALICE, "GET", "/v1/models/" + CLOUD.replace(":", "%3a"), None),
        (
            CAROL,
            "POST",
            "/api/copy",
            {"source": "llama3.2", "Source": "qwen2.5:7b", "destination": "llama3.2:x"},
        ),
        (CAROL, "POST", "/api/copy", {"source": "llama3.2", "DESTINATION": "qwen2.5:mine"}),
        (CAROL, "POST", "/api/create", {"model": "llama3.2:mine", "From": "qwen2.5:7b"}),
        (CAROL, "POST", "/api/create", {"name": "llama3.2:mine", "FROM": CLOUD}),
        (CAROL, "POST", "/api/create", {"model": "qwen2.5:mine", "from": "llama3.2"}),
        (CAROL, "DELETE", "/api/delete", {"model": "llama3.2", "Name": "qwen2.5:7b"}),
    ],
)
async def test_models_named_in_paths_and_management_bodies(
    locked: RunningGateway,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    who: dict[str, str],
    method: str,
    path: str,
    body: dict[str, str] | None,
) -> None:
    status, ctype, answer = await send(http, method, locked.url + path, json=body, headers=who)
    assert (status, ctype) == (403, "application/json")
    assert json.loads(answer)["error"].startswith("model not allowed")
    assert fake.requests == []


# --- token budgets ------------------------------------------------------------------------


def go_view(obj: dict[str, Any], field_name: str) -> Any:
    """What Go's encoding/json binds to `field_name`: the last key that folds to it."""
    value = None
    for key, item in obj.items():
        if key.casefold() == field_name:
            value = item
    return value


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"stream": True}, {"Content-Encoding": "identity"}),
        ({"Stream": True}, {}),
        ({"stream": False, "STREAM": True}, {}),
        ({"stream": True, "stream_options": {"include_usage": True}, "Stream_Options": {}}, {}),
        ({"stream": True, "stream_options": {"include_usage": True, "INCLUDE_USAGE": False}}, {}),
    ],
)
async def test_token_budget_cannot_be_dodged_by_key_case_or_encoding(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    config = policy_config(fake.url)
    config["roles"] = {
        "user": {"models": ["*"], "limits": {"tokens_per_minute": 1000}},
        "admin": {"models": ["*"]},
    }
    gw = await gateway_factory(config)
    contexts = Observed(gw.app)
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], **body}
    status, _, _ = await send(
        http,
        "POST",
        gw.url + "/v1/chat/completions",
        data=json.dumps(chat).encode(),
        headers={**ALICE, **JSON, **headers},
    )
    assert status == 200
    sent = json.loads(fake.requests[-1].body or b"")
    # Read the Go way, the forwarded body asks Ollama for usage: there is no spelling of
    # `stream`/`stream_options` that streams without it.
    assert go_view(go_view(sent, "stream_options"), "include_usage") is True
    (ctx,) = await contexts.wait(1)
    assert ctx.usage is not None and ctx.usage.total == 36  # and the budget was charged


# --- routes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "who"),
    [
        ("GET", "/HEALTHZ", {}),
        ("POST", "/healthz/", {}),
        ("DELETE", "//readyz", {}),
        ("POST", "/Readyz?x=1", {}),
        ("GET", "/METRICS", {"Authorization": f"Bearer {ROOT_KEY}"}),
    ],
)
async def test_gateway_endpoint_spellings_are_never_relayed(
    locked: RunningGateway,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    who: dict[str, str],
) -> None:
    status, ctype, _ = await send(
        http, method, locked.url + path, data=json.dumps({"model": CLOUD}), headers=who
    )
    assert (status, ctype) == (403, "application/json")
    assert fake.requests == []


# --- leaks --------------------------------------------------------------------------------


async def test_upstream_never_sees_credentials(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    extra = {
        "Cookie": "session=LeakCookie",
        "Proxy-Authorization": "Basic TGVha1Byb3h5",
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "LeakHop",
    }
    for credential in (ALICE, {"X-API-Key": ALICE_KEY}, {"Authorization": f"Bearer {ALICE_KEY}"}):
        status, _, _ = await send(
            http, "GET", locked.url + "/api/tags", headers={**credential, **extra}
        )
        assert status == 200
    assert len(fake.requests) == 3
    for seen in fake.requests:
        names = {name.lower() for name in seen.headers}
        assert not names & {"authorization", "x-api-key", "cookie", "proxy-authorization"}
        text = json.dumps(list(seen.headers.items()))
        for secret in ("Leak", ALICE_KEY, ALICE["Authorization"][6:]):
            assert secret not in text


async def test_refused_targets_never_log_userinfo(
    locked: RunningGateway, fake: FakeOllama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    contexts = Observed(locked.app)
    for line in (
        b"GET http://alice:UserinfoPw@evil/api/tags/..",
        b"POST https://alice:UserinfoPw@evil/api/%zz",
        b"CONNECT alice:UserinfoPw@evil:443",
    ):
        payload = line + b" HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        assert statuses(await exchange(locked.host_port, payload)) == [400]
    seen = await contexts.wait(3)
    assert [ctx.path for ctx in seen] == ["/api/tags/..", "/api/%zz", "-"]
    assert "UserinfoPw" not in caplog.text
    assert fake.requests == []


SECRETS = ("Plain-LEAK-1", "sk-LEAK-2-not-a-hash", "short-LEAK-3", "LEAK-4-typo")


def leaky_config(upstream: str) -> str:
    return yaml.safe_dump(
        {
            "upstream": {"url": upstream},
            "auth": {
                "users": {"alice": {"password": SECRETS[0]}},
                "api_keys": [{"name": "k", "sha256": SECRETS[1]}],
                "jwt": {"algorithms": ["HS256"], "secret": SECRETS[2], "secrett": SECRETS[3]},
            },
        }
    )


async def test_check_and_reload_never_print_secrets(
    locked: RunningGateway,
    fake: FakeOllama,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "leaky.yaml"
    path.write_text(leaky_config(fake.url))
    assert cli_main(["check", "--config", str(path)]) == 2
    printed = capsys.readouterr()
    assert "auth.jwt.secret" in printed.out  # the problems are named...
    caplog.set_level(logging.DEBUG)
    assert await reload_config(locked.app, path) is False
    assert "reload refused" in caplog.text
    for secret in SECRETS:  # ...never the values
        assert secret not in printed.out + printed.err
        assert secret not in caplog.text


# --- browsers -----------------------------------------------------------------------------


async def test_cors_preflights_and_foreign_origins_with_credentials(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(policy_config(fake.url, cors={"origins": ["https://app.example"]}))
    preflight = {"Access-Control-Request-Method": "POST", **ALICE, "Cookie": "s=1"}
    for origin in ("https://evil.example", "null", "https://app.example.evil.example"):
        status, _, _ = await send(
            http, "OPTIONS", gw.url + "/api/pull", headers={**preflight, "Origin": origin}
        )
        assert status == 403
    async with http.options(
        gw.url + "/api/pull", headers={**preflight, "Origin": "https://app.example"}
    ) as r:
        assert r.status == 204  # credentials on a preflight change nothing...
        assert "Access-Control-Allow-Credentials" not in r.headers  # ...and are never invited
    for origin in ("https://evil.example", "null"):
        async with http.post(
            gw.url + "/api/chat", json={"model": "llama3.2"}, headers={**ALICE, "Origin": origin}
        ) as r:
            assert r.status == 403  # a foreign page riding on the browser's Basic login
            assert "Access-Control-Allow-Origin" not in r.headers
    async with http.get(
        gw.url + "/api/tags",
        headers={"Authorization": f"Bearer {ALICE_KEY}", "Origin": "https://evil.example"},
    ) as r:
        assert r.status == 200  # explicit key: not ambient, but the page cannot read it
        assert "Access-Control-Allow-Origin" not in r.headers
        assert "Access-Control-Allow-Credentials" not in r.headers
    assert [r.path for r in fake.requests] == ["/api/tags"]
    assert "Origin" not in fake.requests[0].headers


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/api/chat", {"data": b"{not json"}),
        ("POST", "/api/chat", {"data": b"\xff\xfe{}"}),
        ("POST", "/api/chat", {"data": b"[]"}),
        ("POST", "/api/chat", {"data": b"{}", "headers": {"Content-Encoding": "gzip"}}),
        ("POST", "/api/chat", {"data": b"x", "headers": {"Content-Encoding": "br"}}),
        (
            "POST",
            "/api/chat",
            {"data": gzip.compress(b"\xff"), "headers": {"Content-Encoding": "gzip"}},
        ),
        (
            "POST",
            "/api/chat",
            {"data": gzip.compress(b"{}")[:-4], "headers": {"Content-Encoding": "gzip"}},
        ),
        ("POST", "/api/chat", {"data": b"{}" * 3000}),
        ("POST", "/v1/audio/transcriptions", {"data": b'{"model":"x"}'}),
        ("GET", "/api/%zz", {}),
        ("GET", "/" + "a/" * 2100, {}),
        ("PUT", "/api/chat", {}),
        ("PATCH", "/api/tags", {}),
        ("GET", "/nowhere", {}),
        ("POST", "/healthz", {}),
        ("GET", "/api/tags", {"headers": {"Authorization": "Negotiate abc"}}),
        ("GET", "/api/tags", {"headers": {"Authorization": "Bearer a b"}}),
        (
            "POST",
            "/api/chat",
            {"data": b'{"model":"llama3.2"}', "headers": {"Expect": "100-continue"}},
        ),
    ],
)
async def test_client_mistakes_are_json_4xx(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    kwargs: dict[str, Any],
) -> None:
    gw = await gateway_factory(policy_config(fake.url, max_body_bytes=4096))
    headers = {**ALICE, **JSON, **kwargs.pop("headers", {})}
    status, ctype, body = await send(http, method, gw.url + path, headers=headers, **kwargs)
    if status == 200:  # the one well-formed case above (Expect) must really have been served
        assert [r.path for r in fake.requests] == ["/api/chat"]
        return
    assert 400 <= status < 500 and ctype == "application/json", (status, body)
    assert set(json.loads(body)) == {"error"} and b"Traceback" not in body
    assert fake.requests == []
