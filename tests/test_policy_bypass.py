"""The bypass table: spellings of an admin-only route, over a raw socket, never reach Ollama.

Each raw request line targets `/api/pull` (admin only under the built-in table) as a `user`
principal and anonymously. Whatever the gateway answers (400, 401 or 403), the fake Ollama
must not have received anything at all.
"""

from __future__ import annotations

import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama
from tests.policy_support import basic, policy_config, raw_exchange, request_bytes

PULL_BODY = b'{"model":"tiny","stream":false}'

# Spellings that Go's net/http + gin (or some other server) could route to /api/pull.
PULL_TARGETS: list[bytes] = [
    b"/api/pull",
    b"/api/%70ull",
    b"/api/%70%75%6c%6c",
    b"/%61pi/pull",
    b"/api/pul%6C",
    b"/API/PULL",
    b"/Api/Pull",
    b"/api/PULL",
    b"//api/pull",
    b"/api//pull",
    b"///api///pull",
    b"/api/pull/",
    b"/api/pull//",
    b"/v1/../api/pull",
    b"/v1/%2e%2e/api/pull",
    b"/v1/%2E%2E/api/pull",
    b"/v1/.%2e/api/pull",
    b"/api/./pull",
    b"/api/%2e/pull",
    b"/./api/pull",
    b"/v1/chat/../../api/pull",
    b"/v1/..%2Fapi/pull",
    b"/v1%2F..%2Fapi%2Fpull",
    b"/api%2Fpull",
    b"/api%2fpull",
    b"/api/pull%00",
    b"/api/pull%00.json",
    b"/api/pull%0a",
    b"/api/pull;x=1",
    b"/api/pull;",
    b"/api;/pull",
    b"/api/pull%3b",
    b"/api\\pull",
    b"/api%5Cpull",
    b"/v1\\..\\api\\pull",
    b"/api/%2570ull",
    b"/api/pull%2F",
    b"/api/pull%20",
    b"/api/pull%09",
    b"/api/pull#frag",
    b"/api/pull%23",
    b"/api/pull?x=/../v1/chat/completions",
    b"http://127.0.0.1/api/pull",
    b"http://evil.example/api/pull",
    b"HTTP://evil:80/api/pull",
    b"http://evil.example/v1/../api/pull",
    b"http://evil.example//api/pull",
    b"http://evil.example/API/PULL",
    b"https://evil.example/api/%70ull",
    b"http://evil.example/v1/chat/completions/../../../api/pull",
    b"/api/p\xc3\xbcll",
    b"/api/pu ll",
    b"*",
    b"api/pull",
    # The server-selector prefix is judged on the path without it.
    b"/upstreams/default/api/pull",
    b"/upstreams/nope/api/pull",
    b"/UPSTREAMS/default/api/pull",
    b"/upstreams/DEFAULT/API/PULL",
    b"/upstreams/%64efault/api/pull",
    b"/upstreams/default//api/pull",
    b"/upstreams/default/../api/pull",
    b"/upstreams/default/%2e%2e/api/pull",
    b"/upstreams/default/api%2Fpull",
    b"/upstreams%2Fdefault/api/pull",
    b"/upstreams/default/upstreams/default/api/pull",
    b"/v1/../upstreams/default/api/pull",
    b"http://evil.example/upstreams/default/api/pull",
]


@pytest.fixture
async def locked(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    return await gateway_factory(policy_config(fake.url))


@pytest.mark.parametrize("target", PULL_TARGETS, ids=lambda t: t.decode("latin-1"))
@pytest.mark.parametrize("who", ["user", "anonymous"])
async def test_no_spelling_of_pull_reaches_ollama(
    locked: RunningGateway, fake: FakeOllama, target: bytes, who: str
) -> None:
    headers = basic("alice") if who == "user" else {}
    headers["Content-Type"] = "application/json"
    statuses = await raw_exchange(
        locked.host_port, request_bytes("POST", target, headers=headers, body=PULL_BODY)
    )
    assert statuses, "no response"
    assert statuses[0] in (400, 401, 403), statuses
    if who == "user" and statuses[0] != 400:
        assert statuses[0] == 403  # authenticated: refused, not challenged
    assert fake.requests == []  # the fake Ollama never saw the call, in any spelling


SMUGGLING: dict[str, bytes] = {
    # Content-Length and Transfer-Encoding together: which one frames the body?
    "cl-and-te": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 31\r\n"
        b"Connection: close\r\n\r\n" + PULL_BODY
    ),
    "te-and-cl": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 90\r\n\r\n0\r\n\r\n"
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 31\r\n"
        b"Connection: close\r\n\r\n" + PULL_BODY
    ),
    "two-content-lengths": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 0\r\n"
        b"Content-Length: 90\r\n\r\n"
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 31\r\n"
        b"Connection: close\r\n\r\n" + PULL_BODY
    ),
    "te-list": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nTransfer-Encoding: chunked, identity"
        b"\r\nConnection: close\r\n\r\n0\r\n\r\n"
    ),
    "te-twice": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\nConnection: close\r\n\r\n0\r\n\r\n"
    ),
    "te-space-before-colon": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nTransfer-Encoding : chunked\r\n"
        b"Content-Length: 4\r\nConnection: close\r\n\r\n0\r\n\r\n"
    ),
    "cl-plus-sign": (
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: +31\r\n"
        b"Connection: close\r\n\r\n" + PULL_BODY
    ),
    "obs-fold": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nX-A: 1\r\n Transfer-Encoding: chunked"
        b"\r\nContent-Length: 4\r\nConnection: close\r\n\r\n0\r\n\r\n"
    ),
    # An allowed request followed, on the same connection, by a forbidden one: each
    # request is judged on its own.
    "pipelined": (
        b"GET /api/tags HTTP/1.1\r\nHost: g\r\nAUTH\r\n\r\n"
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 31\r\n"
        b"Connection: close\r\n\r\n" + PULL_BODY
    ),
    "body-hides-request": (
        b"POST /api/chat HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 90\r\n"
        b"Connection: close\r\n\r\n"
        b"POST /api/pull HTTP/1.1\r\nHost: g\r\nAUTH\r\nContent-Length: 31\r\n\r\n" + PULL_BODY
    ),
}


@pytest.mark.parametrize("name", list(SMUGGLING))
async def test_request_smuggling_does_not_reach_pull(
    locked: RunningGateway, fake: FakeOllama, name: str
) -> None:
    auth = ("Authorization: " + basic("alice")["Authorization"]).encode()
    payload = SMUGGLING[name].replace(b"AUTH", auth)
    statuses = await raw_exchange(locked.host_port, payload)
    assert not [r for r in fake.requests if "pull" in r.path.lower()]
    if name == "pipelined":
        assert statuses == [200, 403]
        assert [r.path for r in fake.requests] == ["/api/tags"]
    else:
        # aiohttp's parser refuses every ambiguous framing (and the JSON check refuses a
        # body that is really a second request): nothing is forwarded at all.
        assert statuses == [400]
        assert fake.requests == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/api/chat", "/api/chat"),
        ("//api//chat/", "/api/chat"),
        ("/api/%63hat", "/api/chat"),
        ("/%61pi/chat?stream=1", "/api/chat"),
        ("http://evil.example/api/chat", "/api/chat"),
        ("http://evil.example//api/chat/", "/api/chat"),
    ],
)
async def test_allowed_spellings_are_forwarded_in_canonical_form(
    locked: RunningGateway, fake: FakeOllama, target: str, forwarded: str
) -> None:
    body = b'{"model":"llama3.2","messages":[],"stream":false}'
    headers = {**basic("alice"), "Content-Type": "application/json"}
    statuses = await raw_exchange(
        locked.host_port, request_bytes("POST", target, headers=headers, body=body)
    )
    assert statuses == [200]
    [seen] = fake.requests
    assert seen.path == forwarded  # exactly the path that was authorised
    assert seen.headers["Host"] == fake.url.removeprefix("http://")  # never evil.example
    assert seen.body == body
