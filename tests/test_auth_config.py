"""`auth:` validation: every problem reported with its key path, never echoing a secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.auth.hashes import passlib_hash
from gateway.cli import main
from gateway.config_load import ConfigError, load_config, parse_config
from tests.auth_support import FAST_BCRYPT


def problems(auth: dict[str, object], tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"auth": auth}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return {p.path: p.message for p in info.value.problems}


def test_accepted_user_hashes_load(tmp_path: Path) -> None:
    users = {
        "a": {"password": FAST_BCRYPT.hash("x")},
        "b": {"password": passlib_hash.argon2.using(rounds=1, memory_cost=256).hash("x")},
        "c": {"password": passlib_hash.pbkdf2_sha256.using(rounds=1000).hash("x")},
        "d": {"password": passlib_hash.sha512_crypt.using(rounds=1000).hash("x")},
        "e": {"password": passlib_hash.apr_md5_crypt.hash("x")},
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"auth": {"users": users}}))
    assert set(load_config(path).auth.users) == set(users)


def test_refused_user_passwords(tmp_path: Path) -> None:
    found = problems(
        {
            "users": {
                "plain": {"password": "hunter2-plaintext"},
                "des": {"password": passlib_hash.des_crypt.hash("x")},
                "sha": {"password": passlib_hash.ldap_sha1.hash("x")},
                "cut": {"password": FAST_BCRYPT.hash("x")[:-5]},
                "a:b": {"password": FAST_BCRYPT.hash("x")},
            }
        },
        tmp_path,
    )
    assert "plaintext passwords are refused" in found["auth.users.plain.password"]
    assert "crypt-DES" in found["auth.users.des.password"]
    assert "SHA-1" in found["auth.users.sha.password"]
    assert "malformed" in found["auth.users.cut.password"]
    assert "without ':'" in found["auth.users.a:b"]
    assert "hunter2" not in " ".join(found.values())  # never echo the value


def test_htpasswd_lines_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "htpasswd"
    file.write_text(
        f"good:{FAST_BCRYPT.using(ident='2y').hash('x')}\n"
        "plain:cleartext-password\n"
        f"des:{passlib_hash.des_crypt.hash('x')}\n"
        "nocolon\n"
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"auth": {"htpasswd": "htpasswd"}}))  # relative to config
    assert main(["check", "--config", str(config)]) == 2
    out = capsys.readouterr().out
    assert out.startswith("auth.htpasswd: line 2: the password of 'plain' is not a password hash")
    assert "line 3: the password of 'des' uses crypt-DES" in out
    assert "line 4: expected `user:hash`" in out
    assert "cleartext-password" not in out


def test_htpasswd_file_must_exist(tmp_path: Path) -> None:
    found = problems({"htpasswd": str(tmp_path / "missing")}, tmp_path)
    assert found["auth.htpasswd"].startswith("file not found")


def test_api_keys_are_checked(tmp_path: Path) -> None:
    digest = "ab" * 32
    found = problems(
        {
            "api_keys": [
                {"name": "one", "sha256": digest},
                {"name": "one", "sha256": digest.upper()},
                {"name": "two", "sha256": "ogw_this-is-a-raw-key"},
            ]
        },
        tmp_path,
    )
    assert found["auth.api_keys[1].name"] == "'one' is used by another key"
    assert found["auth.api_keys[1].sha256"] == "the same key is listed twice"
    assert "64 hex characters" in found["auth.api_keys[2].sha256"]
    assert "ogw_this" not in " ".join(found.values())


def test_jwt_checks(tmp_path: Path) -> None:
    found = problems({"jwt": {"algorithms": ["HS256", "XS999"], "secret": "too-short"}}, tmp_path)
    assert "unknown algorithm 'XS999'" in found["auth.jwt.algorithms[1]"]
    assert "at least 32 bytes" in found["auth.jwt.secret"]
    assert "too-short" not in " ".join(found.values())
    found = problems({"jwt": {"algorithms": []}}, tmp_path)
    assert found["auth.jwt.algorithms"] == "list at least one algorithm"
    found = problems({"jwt": {"algorithms": ["HS256"]}}, tmp_path)
    assert found["auth.jwt.secret"] == "is required for HS* algorithms"


def test_secret_from_environment(tmp_path: Path) -> None:
    text = "auth: {jwt: {algorithms: [HS512], secret: '${JWT_SECRET}'}}"
    config = parse_config(text, env={"JWT_SECRET": "x" * 64})
    assert config.auth.jwt is not None and config.auth.jwt.secret is not None
    assert "x" * 64 not in repr(config)  # Secret masks itself
