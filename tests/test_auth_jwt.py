"""JWT bearer tokens: algorithms, claims, keys, and a JWKS issuer that rotates its keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.config_load import ConfigError, parse_config
from gateway.keys import OBSERVERS
from tests.auth_support import FAST_BCRYPT, FakeClock, authenticator, basic, bearer, config

SECRET = "an-hs256-secret-of-at-least-32-bytes!!"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def claims(clock: FakeClock | None = None, **extra: Any) -> dict[str, Any]:
    now = clock.now if clock else __import__("time").time()
    return {"sub": "tess", "roles": ["user"], "iat": int(now), "exp": int(now) + 300, **extra}


def hs(payload: dict[str, Any], **headers: Any) -> str:
    return jwt.encode(payload, SECRET, algorithm="HS256", headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def outcome(gw: Any, http: Any, token: str) -> tuple[int, str]:
    """(status, reason label) of one request; safe to run concurrently."""
    request_id = uuid.uuid4().hex
    reasons: list[str] = []

    def observe(ctx: Any) -> None:
        if ctx.request_id == request_id:
            reasons.append(ctx.error_reason)

    gw.app[OBSERVERS].append(observe)
    try:
        headers = {**bearer(token), "X-Request-Id": request_id}
        async with http.get(f"{gw.url}/api/tags", headers=headers) as r:
            await r.read()
            return r.status, reasons[0]
    finally:
        gw.app[OBSERVERS].remove(observe)


def hs_config(fake: Any, **jwt_extra: Any) -> dict[str, Any]:
    return config(fake, jwt={"algorithms": ["HS256"], "secret": SECRET, **jwt_extra})


async def test_hs256_token(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(hs_config(fake))
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append((ctx.auth_method, ctx.principal)))
    assert (await outcome(gw, http, hs(claims())))[0] == 200
    method, principal = seen[0]
    assert method == "jwt" and principal.method == "jwt"
    assert principal.user == "tess" and principal.roles == frozenset({"user"})
    assert principal.credential_id == "tess"
    (forwarded,) = fake.requests_to("/api/tags")
    assert "Authorization" not in forwarded.headers


async def test_alg_none_is_refused(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(hs_config(fake))
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert await outcome(gw, http, unsigned) == (401, "invalid_token")
    # Also with a forged signature segment and upper-case spelling.
    head = b64url(json.dumps({"alg": "None", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    assert await outcome(gw, http, f"{head}.{body}.c2ln") == (401, "invalid_token")


def test_alg_none_in_config_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f"auth: {{jwt: {{algorithms: [none], secret: '{SECRET}'}}}}")
    assert "never accepted" in str(info.value)


async def test_rs_public_key_as_hs_secret_fails(
    gateway_factory, fake, http, rsa_key, tmp_path
) -> None:
    """The classic confusion: HS256 signed with the server's own public key as secret."""
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(rsa_key))
    gw = await gateway_factory(config(fake, jwt={"algorithms": ["RS256"], "public_key": str(pem)}))
    good = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await outcome(gw, http, good))[0] == 200
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    signature = hmac.new(pem.read_bytes(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{b64url(signature)}"
    assert await outcome(gw, http, forged) == (401, "invalid_token")


def test_mixing_hs_and_asymmetric_is_a_config_error(tmp_path, rsa_key) -> None:
    pem = tmp_path / "public.pem"
    pem.write_bytes(public_pem(rsa_key))
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"auth: {{jwt: {{algorithms: [HS256, RS256], secret: '{SECRET}', public_key: {pem}}}}}"
        )
    assert "algorithm confusion" in str(info.value)


async def test_exp_is_required(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(hs_config(fake))
    payload = claims()
    del payload["exp"]
    assert await outcome(gw, http, hs(payload)) == (401, "invalid_token")
    assert await outcome(gw, http, hs(claims(exp="tomorrow"))) == (401, "invalid_token")
    for never in (float("nan"), float("inf")):  # JSON NaN/Infinity would never expire
        assert await outcome(gw, http, hs(claims(exp=never))) == (401, "invalid_token")


async def test_exp_nbf_iat_with_leeway(gateway_factory, fake, http) -> None:
    clock = FakeClock()
    gw = await gateway_factory(hs_config(fake, leeway=30), clock=clock)
    now = int(clock.now)
    assert (await outcome(gw, http, hs(claims(clock, exp=now - 10))))[0] == 200  # within leeway
    assert await outcome(gw, http, hs(claims(clock, exp=now - 31))) == (401, "expired_token")
    assert await outcome(gw, http, hs(claims(clock, nbf=now + 60))) == (401, "invalid_token")
    assert await outcome(gw, http, hs(claims(clock, iat=now + 60))) == (401, "invalid_token")
    token = hs(claims(clock))
    assert (await outcome(gw, http, token))[0] == 200
    clock.advance(331)
    assert await outcome(gw, http, token) == (401, "expired_token")


async def test_issuer_and_audience(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(hs_config(fake, issuer="https://idp", audience="ollama-gateway"))
    ok = claims(iss="https://idp", aud="ollama-gateway")
    assert (await outcome(gw, http, hs(ok)))[0] == 200
    assert (await outcome(gw, http, hs({**ok, "aud": ["other", "ollama-gateway"]})))[0] == 200
    for bad in (
        {**ok, "iss": "https://evil"},
        {**ok, "aud": "other"},
        {k: v for k, v in ok.items() if k != "aud"},
        {k: v for k, v in ok.items() if k != "iss"},
    ):
        assert await outcome(gw, http, hs(bad)) == (401, "invalid_token")


async def test_roles_claim_list_string_and_custom_claims(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(
        hs_config(fake, user_claim="preferred_username", roles_claim="realm_access.roles")
    )
    seen = []
    gw.app[OBSERVERS].append(lambda ctx: seen.append(ctx.principal))
    base = claims(preferred_username="ursula")
    for roles in (["user", "admin"], "user admin"):
        token = hs({**base, "realm_access": {"roles": roles}})
        assert (await outcome(gw, http, token))[0] == 200
    assert [p.roles for p in seen] == [frozenset({"user", "admin"})] * 2
    assert {p.user for p in seen} == {"ursula"}
    assert seen[0].credential_id == "tess"  # the subject names the token in logs
    for junk in ({"realm_access": {"roles": [1, 2]}}, {"realm_access": {"roles": {"a": 1}}}):
        assert await outcome(gw, http, hs({**base, **junk})) == (401, "invalid_token")
    # No user claim at all.
    assert await outcome(gw, http, hs(claims())) == (401, "invalid_token")


async def test_wrong_secret_and_tampering(gateway_factory, fake, http) -> None:
    gw = await gateway_factory(hs_config(fake))
    other = jwt.encode(claims(), "another-secret-that-is-long-enough-too!", algorithm="HS256")
    assert await outcome(gw, http, other) == (401, "invalid_token")
    head, body, sig = hs(claims()).split(".")
    tampered = b64url(json.dumps(claims(roles=["admin"])).encode())
    assert await outcome(gw, http, f"{head}.{tampered}.{sig}") == (401, "invalid_token")
    assert await outcome(gw, http, "eyJ.eyJ.sig") == (401, "invalid_token")


def test_short_hs_secret_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {jwt: {algorithms: [HS256], secret: short}}")
    assert "auth.jwt.secret: must be at least 32 bytes" in str(info.value)


# --- JWKS -------------------------------------------------------------------------------


class Issuer:
    """A tiny JWKS endpoint on 127.0.0.1 that counts its hits."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.hits = 0
        self.status = 200
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response({"keys": self.keys}, status=self.status)

    def publish(self, kid: str, key: Any, alg: str = "RS256") -> None:
        algo = RSAAlgorithm if alg[:2] in ("RS", "PS") else ECAlgorithm
        jwk = algo.to_jwk(key.public_key(), as_dict=True)
        self.keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    server = Issuer()
    app = web.Application()
    app.router.add_get("/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/jwks.json"
    yield server
    await runner.cleanup()


def jwks_config(fake: Any, issuer: Issuer, **extra: Any) -> dict[str, Any]:
    return config(
        fake,
        jwt={
            "algorithms": ["RS256", "ES256"],
            "jwks_url": issuer.url,
            "jwks_min_refresh_seconds": 30,
            **extra,
        },
        lockout={"max_failures": 1000},  # floods of bad tokens below: not a lockout test
    )


def signed(key: Any, kid: str, clock: FakeClock, alg: str = "RS256") -> str:
    return jwt.encode(claims(clock), key, algorithm=alg, headers={"kid": kid})


async def test_jwks_rotation_and_refresh_rate_limit(
    gateway_factory, fake, http, issuer, rsa_key, rsa_key2
) -> None:
    clock = FakeClock()
    issuer.publish("k1", rsa_key)
    gw = await gateway_factory(jwks_config(fake, issuer), clock=clock)
    assert issuer.hits == 0  # nothing fetched at build time
    assert (await outcome(gw, http, signed(rsa_key, "k1", clock)))[0] == 200
    assert (await outcome(gw, http, signed(rsa_key, "k1", clock)))[0] == 200
    assert issuer.hits == 1  # cached

    # A flood of made-up kids right after a fetch: no refetch at all.
    forged = [signed(rsa_key2, f"bogus-{i}", clock) for i in range(20)]
    results = await asyncio.gather(*(outcome(gw, http, t) for t in forged))
    assert {r[0] for r in results} == {401}
    assert issuer.hits == 1

    # Later, the same flood costs the issuer exactly one request.
    clock.advance(31)
    results = await asyncio.gather(*(outcome(gw, http, t) for t in forged))
    assert {r[0] for r in results} == {401}
    assert issuer.hits == 2

    # Rotation: k2 replaces k1. After the interval, k2 tokens trigger one refresh, and
    # those arriving while it is in flight wait for it instead of failing.
    issuer.keys.clear()
    issuer.publish("k2", rsa_key2)
    clock.advance(31)
    rotated = [signed(rsa_key2, "k2", clock) for _ in range(5)]
    results = await asyncio.gather(*(outcome(gw, http, t) for t in rotated))
    assert [r[0] for r in results] == [200] * 5
    assert issuer.hits == 3
    assert await outcome(gw, http, signed(rsa_key, "k1", clock)) == (401, "invalid_token")
    assert authenticator(gw).jwt.jwks.fetches == 3


async def test_jwks_cache_expiry_and_es256(gateway_factory, fake, http, issuer) -> None:
    clock = FakeClock()
    ec_key = ec.generate_private_key(ec.SECP256R1())
    issuer.publish("e1", ec_key, alg="ES256")
    gw = await gateway_factory(jwks_config(fake, issuer, jwks_cache_seconds=600), clock=clock)
    assert (await outcome(gw, http, signed(ec_key, "e1", clock, alg="ES256")))[0] == 200
    clock.advance(601)
    assert (await outcome(gw, http, signed(ec_key, "e1", clock, alg="ES256")))[0] == 200
    assert issuer.hits == 2


async def test_jwk_type_and_alg_must_match_the_token(
    gateway_factory, fake, http, issuer, rsa_key
) -> None:
    clock = FakeClock()
    issuer.publish("k1", rsa_key)  # pinned to RS256
    gw = await gateway_factory(jwks_config(fake, issuer), clock=clock)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    # An ES256 token naming an RSA key: refused, whatever its signature.
    token = signed(ec_key, "k1", clock, alg="ES256")
    assert await outcome(gw, http, token) == (401, "invalid_token")


async def test_jwks_unreachable(gateway_factory, fake, http, issuer, rsa_key) -> None:
    clock = FakeClock()
    issuer.publish("k1", rsa_key)
    issuer.status = 500
    gw = await gateway_factory(jwks_config(fake, issuer), clock=clock)
    assert await outcome(gw, http, signed(rsa_key, "k1", clock)) == (401, "jwks_unavailable")
    issuer.status = 200
    clock.advance(31)
    assert (await outcome(gw, http, signed(rsa_key, "k1", clock)))[0] == 200


async def test_an_unreachable_issuer_counts_against_no_address(
    gateway_factory, fake, http, issuer, rsa_key
) -> None:
    clock = FakeClock()
    issuer.publish("k1", rsa_key)
    issuer.status = 500
    cfg = config(
        fake,
        users={"bob": {"password": FAST_BCRYPT.hash("pw")}},
        jwt={"algorithms": ["RS256"], "jwks_url": issuer.url},
        lockout={"max_failures": 1, "address_max_failures": 1},
    )
    gw = await gateway_factory(cfg, clock=clock)
    for _ in range(3):  # every user of an office at once, while the IdP is down
        assert await outcome(gw, http, signed(rsa_key, "k1", clock)) == (401, "jwks_unavailable")
        clock.advance(31)
    # Not the office's fault: its cold password logins still run.
    async with http.get(f"{gw.url}/api/tags", headers=basic("bob", "pw")) as r:
        assert r.status == 200


def test_jwks_url_must_be_https_unless_loopback() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {jwt: {algorithms: [RS256], jwks_url: 'http://idp.example/jwks'}}")
    assert "auth.jwt.jwks_url: must be an https://" in str(info.value)
    parse_config("auth: {jwt: {algorithms: [RS256], jwks_url: 'https://idp.example/jwks'}}")


def test_asymmetric_needs_a_key_of_the_right_type(tmp_path: Path, rsa_key) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("auth: {jwt: {algorithms: [RS256]}}")
    assert "need public_key or jwks_url" in str(info.value)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(public_pem(rsa_key))
    with pytest.raises(ConfigError) as info:
        parse_config(f"auth: {{jwt: {{algorithms: [ES256], public_key: {pem}}}}}")
    assert "ES256 needs an EC key" in str(info.value)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key")
    with pytest.raises(ConfigError) as info:
        parse_config(f"auth: {{jwt: {{algorithms: [RS256], public_key: {junk}}}}}")
    assert "auth.jwt.public_key: not a readable PEM public key" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_config(
            f"auth: {{jwt: {{algorithms: [RS256], public_key: {pem}, secret: '{SECRET}'}}}}"
        )
    assert "auth.jwt.secret: is only used with HS*" in str(info.value)
