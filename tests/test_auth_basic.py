"""Basic authentication against auth.users and htpasswd files, through the real gateway."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

import pytest
from aiohttp import web

from gateway.app import create_app
from gateway.auth.hashes import passlib_hash
from gateway.config_load import load_config, parse_config
from gateway.errors import Unauthorized
from gateway.keys import OBSERVERS, STATE
from gateway.state import GatewayState
from tests.auth_support import CHAT, FAST_BCRYPT, FakeClock, authenticator, basic, config
from tests.conftest import require_binary, run_command


@pytest.mark.parametrize(
    "scheme",
    [
        FAST_BCRYPT,
        passlib_hash.argon2.using(rounds=1, memory_cost=256, parallelism=1),
        passlib_hash.pbkdf2_sha256.using(rounds=1000),
        passlib_hash.sha512_crypt.using(rounds=1000),
    ],
    ids=["bcrypt", "argon2", "pbkdf2_sha256", "sha512_crypt"],
)
async def test_users_with_any_passlib_hash(gateway_factory, fake, http, scheme) -> None:
    gw = await gateway_factory(
        config(fake, users={"alice": {"password": scheme.hash("s3cret"), "roles": ["admin"]}})
    )
    async with http.post(f"{gw.url}/api/chat", json=CHAT, headers=basic("alice", "s3cret")) as r:
        assert r.status == 200
    async with http.post(f"{gw.url}/api/chat", json=CHAT, headers=basic("alice", "wrong")) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="ollama-gateway"'
        assert await r.json() == {"error": "invalid credentials"}
    # Only the good request reached Ollama.
    assert len(fake.requests_to("/api/chat")) == 1


async def test_principal_in_context(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(
        config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw"), "roles": ["admin"]}})
    )
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append((ctx.auth_method, ctx.principal)))
    async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
        assert r.status == 200
    async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "nope")) as r:
        assert r.status == 401
    async with http.get(f"{gw.url}/api/tags") as r:
        assert r.status == 401  # no credentials: the route policy refuses /api/tags
    (method, principal), (failed_method, failed), (none_method, anonymous) = seen
    assert method == "basic" and principal.user == "alice"
    assert principal.roles == frozenset({"admin"}) and principal.method == "basic"
    assert failed_method == "basic" and failed is None
    assert none_method is None and anonymous is None


async def test_utf8_users_and_colons_in_passwords(gateway_factory, fake, http) -> None:
    password = "pä:ss:wörd 🦙"
    gw = await gateway_factory(
        config(fake, users={"jürgen": {"password": FAST_BCRYPT.hash(password)}})
    )
    async with http.get(f"{gw.url}/api/tags", headers=basic("jürgen", password)) as r:
        assert r.status == 200
    async with http.get(f"{gw.url}/api/tags", headers=basic("jürgen", "pä")) as r:
        assert r.status == 401


async def test_curl_user_option(gateway_factory, fake) -> None:
    curl = require_binary("curl")
    gw = await gateway_factory(config(fake, users={"carol": {"password": FAST_BCRYPT.hash("a:b")}}))

    async def status(user: str) -> str:
        argv = (curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", user)
        _code, out, _err = await run_command(*argv, f"{gw.url}/api/tags")
        return out

    assert await status("carol:a:b") == "200"
    assert await status("carol:a") == "401"


def _htpasswd_lines() -> str:
    bcrypt_2y = FAST_BCRYPT.using(ident="2y").hash("bpass")
    assert bcrypt_2y.startswith("$2y$")
    apr1 = passlib_hash.apr_md5_crypt.hash("apass")
    sha512 = passlib_hash.sha512_crypt.using(rounds=1000).hash("spass")
    return f"# made by htpasswd\nbee:{bcrypt_2y}\napr:{apr1}\n\nsha:{sha512}:a comment\n"


async def test_htpasswd_schemes(gateway_factory, fake, http, tmp_path: Path) -> None:
    file = tmp_path / "htpasswd"
    file.write_text(_htpasswd_lines())
    gw = await gateway_factory(config(fake, htpasswd=str(file), htpasswd_roles=["admin"]))
    for user, password in (("bee", "bpass"), ("apr", "apass"), ("sha", "spass")):
        async with http.get(f"{gw.url}/api/tags", headers=basic(user, password)) as r:
            assert r.status == 200, user
        async with http.get(f"{gw.url}/api/tags", headers=basic(user, password + "x")) as r:
            assert r.status == 401, user


async def test_htpasswd_file_from_passlib_apache(gateway_factory, fake, http, tmp_path) -> None:
    from passlib.apache import HtpasswdFile

    file = tmp_path / "htpasswd"
    ht = HtpasswdFile(str(file), new=True, default_scheme="apr_md5_crypt")
    ht.set_password("dora", "explorer")
    ht.save()
    gw = await gateway_factory(config(fake, htpasswd=str(file)))
    async with http.get(f"{gw.url}/api/tags", headers=basic("dora", "explorer")) as r:
        assert r.status == 200


async def test_htpasswd_change_is_picked_up(gateway_factory, fake, http, tmp_path) -> None:
    clock = FakeClock()
    file = tmp_path / "htpasswd"
    file.write_text(f"old:{passlib_hash.apr_md5_crypt.hash('one')}\n")
    gw = await gateway_factory(config(fake, htpasswd=str(file)), clock=clock)
    async with http.get(f"{gw.url}/api/tags", headers=basic("old", "one")) as r:
        assert r.status == 200
    # Replace it the way editors do (write elsewhere, rename over it).
    new = tmp_path / "htpasswd.new"
    new.write_text(f"new:{passlib_hash.apr_md5_crypt.hash('two')}\n")
    os.replace(new, file)
    clock.advance(2)  # past the stat interval
    async with http.get(f"{gw.url}/api/tags", headers=basic("new", "two")) as r:
        assert r.status == 200
    # The old user is gone, although its success was cached.
    async with http.get(f"{gw.url}/api/tags", headers=basic("old", "one")) as r:
        assert r.status == 401


async def test_cache_makes_repeat_logins_free(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}))
    for _ in range(5):
        async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
            assert r.status == 200
    assert authenticator(gw).basic.verifications == 1


async def test_cache_expires(gateway_factory, fake, http) -> None:
    clock = FakeClock()
    gw = await gateway_factory(
        config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}, cache_seconds=60),
        clock=clock,
    )
    for _ in range(2):
        async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
            assert r.status == 200
    clock.advance(61)
    async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
        assert r.status == 200
    assert authenticator(gw).basic.verifications == 2


async def test_identical_cold_logins_are_coalesced(gateway_factory, fake, http) -> None:
    slow = passlib_hash.bcrypt.using(rounds=10).hash("pw")  # long enough to overlap
    gw = await gateway_factory(config(fake, users={"alice": {"password": slow}}))

    async def call() -> int:
        async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
            return r.status

    assert await asyncio.gather(*(call() for _ in range(10))) == [200] * 10
    assert authenticator(gw).basic.verifications == 1


async def test_reload_starts_with_a_fresh_cache(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}))
    async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
        assert r.status == 200
    # The new config changes alice's password: the old one must stop working at once.
    gw.config_path.write_text(
        gw.config_path.read_text().replace(
            gw.config.auth.users["alice"].password.reveal(), FAST_BCRYPT.hash("new")
        )
    )
    holder = gw.app[STATE]
    holder.swap(GatewayState.build(load_config(gw.config_path), previous=holder.current))
    async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "pw")) as r:
        assert r.status == 401
    async with http.get(f"{gw.url}/api/tags", headers=basic("alice", "new")) as r:
        assert r.status == 200


async def test_unknown_user_and_bad_password_look_the_same(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}))
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append(ctx.error_reason))
    responses = []
    for user in ("alice", "mallory"):
        async with http.get(f"{gw.url}/api/tags", headers=basic(user, "guess")) as r:
            responses.append((r.status, r.headers["WWW-Authenticate"], await r.read()))
    assert responses[0] == responses[1]
    assert seen == ["bad_password", "unknown_credentials"]  # operators still see which
    # The unknown user paid for a hash too (timing does not reveal which names exist).
    assert authenticator(gw).basic.verifications == 2


@pytest.mark.parametrize(
    "value",
    [
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon-here").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8
        "Basic " + base64.b64encode(b":password-without-user").decode(),
        "Basic",
        "Basic " + "A" * 7000,  # huge, under aiohttp's own header limit
        "Bearer",
        "Bearer two words",
        "Digest username=x",
    ],
    ids=[
        "bad-b64",
        "no-colon",
        "non-utf8",
        "no-user",
        "empty",
        "huge",
        "bearer-empty",
        "bearer-space",
        "digest",
    ],
)
async def test_malformed_headers_are_401(gateway_factory, fake, http, value) -> None:
    gw = await gateway_factory(config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}))
    async with http.get(f"{gw.url}/api/tags", headers={"Authorization": value}) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Basic realm=")
        assert "error" in await r.json()
    assert fake.requests_to("/api/tags") == []


async def test_raw_non_utf8_and_oversized_headers(gateway_factory, fake) -> None:
    """Bytes no client library would send, on a raw socket: never a 500."""
    gw = await gateway_factory(config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}))
    host, port = gw.host_port.split(":")

    async def raw(header: bytes) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        head = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + header
        writer.write(head + b"\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        return int(status_line.split()[1])

    assert await raw(b"Authorization: Basic \xff\xfe\xfd") == 401
    assert await raw(b"Authorization: Bearer k\xc3\xa9y") == 401
    assert await raw(b"X-API-Key: \xff") == 401
    assert await raw(b"Authorization: Basic " + b"A" * 20000) in (400, 401, 431)


async def test_two_credentials_are_refused(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake, users={"alice": {"password": FAST_BCRYPT.hash("pw")}}))
    headers = {**basic("alice", "pw"), "X-API-Key": "ogw_whatever"}
    async with http.get(f"{gw.url}/api/tags", headers=headers) as r:
        assert r.status == 401


async def test_lockout_slows_then_blocks_one_address(gateway_factory, fake, http) -> None:
    clock = FakeClock()
    gw = await gateway_factory(
        {
            **config(
                fake,
                users={"alice": {"password": FAST_BCRYPT.hash("pw")}},
                lockout={"max_failures": 4, "window": 60, "block_seconds": 120},
            ),
            "trusted_proxies": ["127.0.0.1/32"],  # lets the test speak for two addresses
        },
        clock=clock,
    )
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    statuses = []
    loop = asyncio.get_running_loop()
    durations = []
    for _ in range(4):
        started = loop.time()
        async with http.get(
            f"{gw.url}/api/tags", headers={**attacker, **basic("alice", "guess")}
        ) as r:
            statuses.append(r.status)
        durations.append(loop.time() - started)
    assert statuses == [401, 401, 401, 401]
    assert durations[2] >= 0.09  # the third failure was slowed down
    # Blocked: even the right password gets 429 from this address, and no hash is spent.
    before = authenticator(gw).basic.verifications
    async with http.get(f"{gw.url}/api/tags", headers={**attacker, **basic("alice", "pw")}) as r:
        assert r.status == 429
        assert 0 < int(r.headers["Retry-After"]) <= 120
        assert "error" in await r.json()
    assert authenticator(gw).basic.verifications == before
    # Another address logs in fine.
    other = {"X-Forwarded-For": "198.51.100.2"}
    async with http.get(f"{gw.url}/api/tags", headers={**other, **basic("alice", "pw")}) as r:
        assert r.status == 200
    # Requests without credentials are the policy's business, not the lockout's.
    async with http.get(f"{gw.url}/api/version", headers=attacker) as r:
        assert r.status == 200
    clock.advance(121)
    async with http.get(f"{gw.url}/api/tags", headers={**attacker, **basic("alice", "pw")}) as r:
        assert r.status == 200


async def test_lockout_memory_is_bounded(gateway_factory, fake) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    gw = await gateway_factory(
        config(
            fake,
            users={"alice": {"password": FAST_BCRYPT.hash("pw")}},
            lockout={"max_failures": 100, "max_tracked": 50},
        )
    )
    auth = authenticator(gw)
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": "Basic !!"}))
    for i in range(200):
        with pytest.raises(Unauthorized):
            await auth.authenticate(headers, f"10.0.{i // 250}.{i % 250}")
    assert len(auth._lockout) == 50


async def test_credentials_never_forwarded_nor_logged(gateway_factory, fake, http, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    password = "Sup3r-S3cret-Pw"
    gw = await gateway_factory(
        config(fake, users={"alice": {"password": FAST_BCRYPT.hash(password)}})
    )
    headers = {**basic("alice", password), "Cookie": "session=abc"}
    async with http.post(f"{gw.url}/api/chat", json=CHAT, headers=headers) as r:
        assert r.status == 200
    for bad in ("wrong-Pw-1", "wrong-Pw-2"):
        async with http.post(f"{gw.url}/api/chat", json=CHAT, headers=basic("alice", bad)) as r:
            assert r.status == 401
    (forwarded,) = fake.requests_to("/api/chat")
    assert "Authorization" not in forwarded.headers and "Cookie" not in forwarded.headers
    encoded = headers["Authorization"].split()[1]
    for secret in (password, encoded, "wrong-Pw-1", "wrong-Pw-2"):
        assert secret not in caplog.text
        assert all(secret not in v for v in forwarded.headers.values())


async def test_no_users_configured_refuses_basic(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake))
    async with http.get(f"{gw.url}/api/tags", headers=basic("x", "y")) as r:
        assert r.status == 401


async def test_realm_is_configurable(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(config(fake, realm='my "lab"'))
    async with http.get(f"{gw.url}/api/tags", headers=basic("x", "y")) as r:
        assert r.headers["WWW-Authenticate"] == 'Basic realm="my \\"lab\\""'


async def test_app_cleanup_closes_the_jwks_session(fake) -> None:
    app = create_app(parse_config(f"upstream: {{url: '{fake.url}'}}"))
    runner = web.AppRunner(app)
    await runner.setup()
    session = app[STATE].current.authenticator._resources.http_session()
    await runner.cleanup()
    assert session.closed


def test_ipv6_addresses_are_grouped_by_64() -> None:
    from gateway.auth.lockout import address_key

    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_key("2001:db8:0:1::1") != address_key("2001:db8::1")
    assert address_key("::ffff:192.0.2.9") == "192.0.2.9"
    assert address_key("192.0.2.9") == "192.0.2.9"
