"""Authorisation over HTTP: bodies (bounds, encodings, malformed), contexts, modes, CORS."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
import zstandard

from gateway.context import RequestContext
from gateway.keys import OBSERVERS
from gateway.policy.decode import UnsupportedEncoding, decode_body
from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama
from tests.policy_support import ROOT_KEY, basic, policy_config

ALICE = basic("alice")
CHAT = {"model": "llama3.2", "messages": [], "stream": False}


@pytest.fixture
async def locked(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    return await gateway_factory(policy_config(fake.url, max_body_bytes=4096))


class Contexts:
    """Collects each finished request's context through the app's observer list."""

    def __init__(self, gw: RunningGateway) -> None:
        self.seen: list[RequestContext] = []
        self._arrived = asyncio.Event()
        gw.app[OBSERVERS].append(self._observe)

    def _observe(self, ctx: RequestContext) -> None:
        self.seen.append(ctx)
        self._arrived.set()

    async def next(self) -> RequestContext:
        while not self.seen:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 5)
        return self.seen.pop(0)


async def post(
    http: aiohttp.ClientSession,
    url: str,
    data: bytes | AsyncIterator[bytes],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str]]:
    async with http.post(url, data=data, headers={**ALICE, **(headers or {})}) as response:
        body = await response.read()
        return response.status, json.loads(body) if body.startswith(b"{") else {}


async def test_context_fields_for_later_stages(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    contexts = Contexts(locked)
    raw = json.dumps({"model": "Llama3.2", "messages": [], "stream": False}).encode()
    assert (await post(http, locked.url + "/api/chat", raw))[0] == 200
    ctx = await contexts.next()
    assert (ctx.route_class, ctx.model, ctx.body) == ("inference", "llama3.2:latest", raw)
    assert ctx.json == {"model": "Llama3.2", "messages": [], "stream": False}
    assert fake.requests[-1].body == raw  # forwarded byte for byte
    async with http.get(locked.url + "/v1/models/qwen2.5:7b", headers=ALICE) as response:
        assert response.status == 200
    ctx = await contexts.next()
    assert (ctx.route_class, ctx.model, ctx.body) == ("read", "qwen2.5:7b", None)
    async with http.post(locked.url + "/api/pull", json={"model": "x"}, headers=ALICE) as r:
        assert r.status == 403
    ctx = await contexts.next()
    assert (ctx.route_class, ctx.status, ctx.error_reason) == ("management", 403, "route")
    async with http.get(locked.url + "/healthz") as response:
        assert response.status == 200
    assert (await contexts.next()).route_class == "gateway"


async def test_body_bounds(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    big = json.dumps({**CHAT, "pad": "x" * 5000}).encode()
    assert (await post(http, locked.url + "/api/chat", big))[0] == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(10):
            yield b" " * 1000

    status, body = await post(http, locked.url + "/api/chat", chunked())
    assert (status, body) == (413, {"error": "request body too large"})
    bomb = gzip.compress(json.dumps({**CHAT, "pad": "x" * 100_000}).encode())
    assert len(bomb) < 4096
    gzipped = {"Content-Encoding": "gzip"}
    assert (await post(http, locked.url + "/api/chat", bomb, gzipped))[0] == 413
    assert fake.requests == []


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"{not json", 400),
        (b'["llama3.2"]', 400),
        (b'{"model": 3}', 400),
        (b'{"model":"llama3.2"}{"model":"gpt-oss:120b-cloud"}', 400),
        (b'{"model":"llama 3"}', 400),
        (b'{"model":"llama3.2\\u0000"}', 400),
        (b"\xff\xfe{\x00}\x00", 400),
        (b'{"model":"llama3.2","MODEL":"gpt-oss:120b-cloud"}', 403),
        (b'{"model":"llama3.2","model":"gpt-oss:120b-cloud"}', 403),
        (b'{"model":"gpt-oss:120b-cloud","model":"llama3.2"}', 403),
        (b'{"Name":"gpt-oss:120b-cloud"}', 403),
    ],
)
async def test_malformed_or_ambiguous_bodies_are_never_forwarded(
    locked: RunningGateway,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    data: bytes,
    status: int,
) -> None:
    got, body = await post(http, locked.url + "/api/chat", data)
    assert got == status and "error" in body
    assert fake.requests == []


async def test_compressed_bodies_are_checked_and_forwarded_unchanged(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    zstd, gzipped = {"Content-Encoding": "zstd"}, {"Content-Encoding": "gzip"}
    url = locked.url + "/v1/responses"
    forbidden = zstandard.ZstdCompressor().compress(b'{"model":"gpt-oss:120b-cloud","input":"x"}')
    status, _ = await post(http, url, forbidden, zstd)
    assert status == 403 and fake.requests == []
    allowed = zstandard.ZstdCompressor().compress(b'{"model":"llama3.2","input":"x"}')
    status, _ = await post(http, url, allowed, zstd)
    assert status == 200
    [seen] = fake.requests
    assert seen.body == allowed and seen.headers["Content-Encoding"] == "zstd"
    zipped = gzip.compress(b'{"model":"gpt-oss:cloud"}')
    assert (await post(http, locked.url + "/api/chat", zipped, gzipped))[0] == 403
    status, body = await post(http, locked.url + "/api/chat", b"{}", {"Content-Encoding": "br"})
    assert (status, body) == (415, {"error": "unsupported Content-Encoding: br"})
    status, _ = await post(http, locked.url + "/api/chat", b"garbage", gzipped)
    assert status == 400
    assert len(fake.requests) == 1


def test_zstd_without_the_package_is_a_clear_415(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(UnsupportedEncoding, match="zstandard"):
        decode_body(b"\x28\xb5\x2f\xfd", ["zstd"], 100)


async def test_transcription_model_field(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    def form(model: str | None) -> aiohttp.FormData:
        data = aiohttp.FormData()
        if model is not None:
            data.add_field("model", model)
        data.add_field("file", b"RIFF", filename="a.wav")
        return data

    url = locked.url + "/v1/audio/transcriptions"
    async with http.post(url, data=form("gpt-oss:120b-cloud"), headers=ALICE) as response:
        assert response.status == 403
    async with http.post(url, data=form(None), headers=ALICE) as response:
        assert response.status == 400  # some Ollama versions would use a model "default"
    async with http.post(
        url + "?model=gpt-oss:120b-cloud", data=form("llama3.2"), headers=ALICE
    ) as response:
        assert response.status == 400  # Go's FormValue prefers the query: not accepted
    assert fake.requests == []
    async with http.post(url, data=form("llama3.2"), headers=ALICE) as response:
        assert response.status == 200
    assert [r.path for r in fake.requests] == ["/v1/audio/transcriptions"]


async def test_blob_uploads_stream_unread_and_unlimited(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    data = b"\x00" * 20_000  # five times max_body_bytes
    url = f"{locked.url}/api/blobs/sha256:{hashlib.sha256(data).hexdigest()}"
    async with http.post(url, data=data, headers=basic("root")) as response:
        assert response.status == 201
    assert fake.requests[-1].body_size == len(data)
    async with http.post(url, data=data, headers=ALICE) as response:
        assert response.status == 403


async def test_unauthenticated_gets_a_basic_challenge(
    locked: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(locked.url + "/api/chat", json=CHAT) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="ollama-gateway"'
    async with http.get(locked.url + "/api/nope") as response:  # no credential would help
        assert response.status == 403
        assert await response.json() == {"error": "route not allowed: GET /api/nope"}


async def test_gateway_endpoints(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(policy_config(fake.url))
    async with http.get(gw.url + "/healthz") as response:
        assert response.status == 200
    async with http.get(gw.url + "/metrics") as response:
        assert response.status == 401
    async with http.get(gw.url + "/metrics", headers=ALICE) as response:
        assert response.status == 403
    async with http.get(gw.url + "/metrics", headers={"Authorization": f"Bearer {ROOT_KEY}"}) as r:
        assert r.status == 200
    assert fake.requests == []


async def test_open_mode_relays_everything(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """No credentials and no routes configured: a plain relay (loopback only)."""
    gateway = await gateway_factory({"upstream": {"url": fake.url}})
    async with http.get(gateway.url + "/api/tags") as response:
        assert "gpt-oss:120b-cloud" in [m["name"] for m in (await response.json())["models"]]
    async with http.post(gateway.url + "/api/pull", json={"model": "tiny", "stream": False}) as r:
        assert r.status == 200
    async with http.post(gateway.url + "/api/chat", data=b"{bad") as response:
        assert response.status == 400  # still never forwards what it cannot read
    async with http.post(gateway.url + "//api/chat/", json=CHAT) as response:
        assert response.status == 200
    assert [r.path for r in fake.requests] == ["/api/tags", "/api/pull", "/api/chat"]


async def test_routes_without_credentials_allow_public_rules_only(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "routes": [
                {"path": "/api/tags", "methods": ["GET"], "public": True},
                {"path": "/api/chat", "methods": ["POST"], "public": True},
                {"path": "/api/*", "methods": ["*"], "authenticated": True},
            ],
            "roles": {
                "user": {"models": ["*"]},
                "admin": {"models": ["*"]},
                "anonymous": {"models": ["qwen*"]},
            },
        }
    )
    async with http.get(gw.url + "/api/tags") as response:
        assert [m["name"] for m in (await response.json())["models"]] == ["qwen2.5:7b"]
    async with http.post(gw.url + "/api/chat", json={**CHAT, "model": "qwen2.5:7b"}) as r:
        assert r.status == 200
    async with http.post(gw.url + "/api/chat", json=CHAT) as response:
        assert response.status == 403
    async with http.post(gw.url + "/api/pull", json={"model": "qwen2.5:7b"}) as response:
        assert response.status == 401
    assert [r.path for r in fake.requests] == ["/api/tags", "/api/chat"]


async def test_cors(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        policy_config(fake.url, cors={"origins": ["https://app.example"], "max_age": 60})
    )
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    async with http.options(gw.url + "/api/chat", headers=preflight) as response:
        assert response.status == 204
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "x-stainless-os" in response.headers["Access-Control-Allow-Headers"]
        assert response.headers["Access-Control-Max-Age"] == "60"
    async with http.options(
        gw.url + "/api/chat", headers={**preflight, "Origin": "https://evil.example"}
    ) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    origin = {"Origin": "https://app.example"}
    async with http.post(gw.url + "/api/chat", json=CHAT, headers={**ALICE, **origin}) as r:
        assert r.status == 200  # relayed response
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Origin" in r.headers["Vary"]
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=origin) as response:
        assert response.status == 401  # gateway-made error: readable by the page too
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    # A foreign page riding on browser-held Basic credentials (CSRF) is refused.
    foreign = {"Origin": "https://evil.example"}
    async with http.post(gw.url + "/api/chat", json=CHAT, headers={**ALICE, **foreign}) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    assert [r.method for r in fake.requests] == ["POST"]  # preflights never forwarded
    assert "Origin" not in fake.requests[0].headers


async def test_cors_off_refuses_preflights(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    async with http.options(locked.url + "/api/tags", headers=headers) as response:
        assert response.status == 403
        assert await response.json() == {"error": "CORS is not enabled on this gateway"}
    async with http.get(locked.url + "/api/tags", headers={**ALICE, **headers}) as response:
        assert response.status == 403  # foreign origin + Basic: refused
    async with http.get(
        locked.url + "/api/tags", headers={"Authorization": f"Bearer {ROOT_KEY}", **headers}
    ) as r:
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    assert [r.method for r in fake.requests] == ["GET"]
