"""hash-password, new-key and token: what they print works against the real gateway."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.auth.hashes import PASSWORDS
from gateway.cli import main
from tests.auth_support import basic, bearer
from tests.conftest import run_command

SECRET = "an-hs256-secret-of-at-least-32-bytes!!"


def run_main(
    args: list[str], capsys: pytest.CaptureFixture[str], stdin: bytes = b"", expect: int = 0
) -> str:
    """The CLI in-process, with a non-tty stdin (the piped path) -> its stdout."""
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        assert main(args) == expect
    finally:
        sys.stdin = old
    return capsys.readouterr().out


async def test_hash_password_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "ollama-gateway"
    argv = (str(script), "hash-password", "--scheme", "pbkdf2_sha256")
    code, out, err = await run_command(*argv, stdin="pä:ss wörd\n".encode())
    assert code == 0, err
    hashed = out.strip()
    assert hashed.startswith("$pbkdf2-sha256$")
    assert PASSWORDS.verify("pä:ss wörd", hashed)  # the shell's newline is not part of it
    assert "ss w" not in out + err


@pytest.mark.parametrize("scheme", ["bcrypt", "argon2", "bcrypt_sha256"])
def test_hash_password_schemes(scheme: str, capsys) -> None:
    hashed = run_main(["hash-password", "--scheme", scheme], capsys, b"pw\n").strip()
    assert PASSWORDS.identify(hashed) == scheme
    assert PASSWORDS.verify("pw", hashed) and not PASSWORDS.verify("pw\n", hashed)


def test_hash_password_default_has_no_72_byte_trap(capsys) -> None:
    long = "p" * 72 + "-the rest matters"
    hashed = run_main(["hash-password"], capsys, long.encode()).strip()
    assert hashed.startswith("$argon2id$")
    assert PASSWORDS.verify(long, hashed)
    assert not PASSWORDS.verify("p" * 72 + "-anything else", hashed)


def test_hash_password_bcrypt_refuses_what_it_would_cut(capsys) -> None:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(b"p" * 73))
    try:
        assert main(["hash-password", "--scheme", "bcrypt"]) == 2
    finally:
        sys.stdin = old
    out, err = capsys.readouterr()
    assert out == "" and "72" in err and "argon2" in err and "p" * 20 not in err
    # 72 bytes exactly is whole in bcrypt: still accepted.
    hashed = run_main(["hash-password", "--scheme", "bcrypt"], capsys, "é".encode() * 36)
    assert PASSWORDS.verify("é" * 36, hashed.strip())
    # bcrypt_sha256 takes the long one whole.
    long = "q" * 100
    hashed = run_main(["hash-password", "--scheme", "bcrypt_sha256"], capsys, long.encode())
    assert PASSWORDS.verify(long, hashed.strip()) and not PASSWORDS.verify("q" * 72, hashed)


def test_hash_password_refuses_empty(capsys) -> None:
    assert run_main(["hash-password"], capsys, b"\n", expect=2) == ""  # no hash of nothing


async def test_users_made_with_hash_password_log_in(gateway_factory, fake, http, capsys) -> None:
    hashed = run_main(["hash-password", "--scheme", "argon2"], capsys, b"s3cret\n").strip()
    gw = await gateway_factory(
        {"upstream": {"url": fake.url}, "auth": {"users": {"ann": {"password": hashed}}}}
    )
    async with http.get(f"{gw.url}/api/tags", headers=basic("ann", "s3cret")) as r:
        assert r.status == 200


async def test_new_key_entry_pastes_into_config(gateway_factory, fake, http, capsys) -> None:
    out = run_main(["new-key", "--user", "robot", "--roles", "user,admin"], capsys)
    key, comment, entry_line = out.splitlines()
    assert key.startswith("ogw_") and "." not in key and len(key) > 40
    assert comment.startswith("#")
    (entry,) = yaml.safe_load(entry_line)
    assert key not in entry_line  # only the digest is stored
    assert entry["user"] == "robot" and entry["roles"] == ["user", "admin"]
    gw = await gateway_factory({"upstream": {"url": fake.url}, "auth": {"api_keys": [entry]}})
    async with http.get(f"{gw.url}/api/tags", headers=bearer(key)) as r:
        assert r.status == 200
    again = run_main(["new-key", "--user", "robot"], capsys).splitlines()[0]
    assert again != key


async def test_token_with_hs_secret(gateway_factory, fake, http, capsys, tmp_path) -> None:
    config = {
        "upstream": {"url": fake.url},
        "auth": {
            "jwt": {"algorithms": ["HS256"], "secret": SECRET, "issuer": "ops", "audience": "gw"}
        },
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    args = ["token", "--config", str(path), "--sub", "ops-bot", "--roles", "user", "--ttl", "60"]
    token = run_main(args, capsys).strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="gw", issuer="ops")
    assert claims["sub"] == "ops-bot" and claims["roles"] == ["user"]
    assert 55 <= claims["exp"] - claims["iat"] <= 60
    gw = await gateway_factory(config)
    async with http.get(f"{gw.url}/api/tags", headers=bearer(token)) as r:
        assert r.status == 200


async def test_token_with_private_key(gateway_factory, fake, http, capsys, tmp_path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    private = tmp_path / "private.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = tmp_path / "public.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = {
        "upstream": {"url": fake.url},
        "auth": {
            "jwt": {
                "algorithms": ["EdDSA"],
                "public_key": "public.pem",
                "private_key": "private.pem",
            }
        },
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    token = run_main(["token", "--config", str(path), "--sub", "ed", "--roles", "user"], capsys)
    assert jwt.get_unverified_header(token.strip())["alg"] == "EdDSA"
    gw = await gateway_factory(
        {**config, "auth": {"jwt": {"algorithms": ["EdDSA"], "public_key": str(public)}}}
    )
    async with http.get(f"{gw.url}/api/tags", headers=bearer(token.strip())) as r:
        assert r.status == 200


def test_token_needs_jwt_config(tmp_path, capsys) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("listen: 127.0.0.1:0\n")
    assert main(["token", "--config", str(path), "--sub", "x"]) == 2
    assert "auth.jwt is not configured" in capsys.readouterr().err
