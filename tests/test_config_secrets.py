"""Secrets from files: `${NAME}` reads the file named by NAME_FILE (Docker/compose secrets)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import aiohttp
import jwt
import pytest

from gateway.config_load import ConfigError, parse_config
from tests.conftest import cli_env, free_port, gateway_process, run_cli
from tests.fake_ollama import FakeOllama

JWT_CONFIG = "auth: {jwt: {algorithms: [HS256], secret: '${JWT_SECRET}'}}\n"


def problems_of(text: str, env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env=env)
    return [str(p) for p in caught.value.problems]


def write_secret(path: Path, value: str) -> str:
    """Written like an editor or `sed -i` does: a new file renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(value, encoding="utf-8")
    os.replace(fresh, path)
    return str(path)


def test_name_file_is_read_without_its_final_line_break(tmp_path: Path) -> None:
    secret = "s" * 40
    file = write_secret(tmp_path / "jwt_secret", secret + "\n")
    config = parse_config(JWT_CONFIG, env={"JWT_SECRET_FILE": file})
    assert config.auth.jwt is not None
    assert config.auth.jwt.secret.reveal() == secret
    assert secret not in repr(config)  # still a masked Secret


def test_file_inside_a_larger_value(tmp_path: Path) -> None:
    file = write_secret(tmp_path / "redis_password", "0123abcd\n")
    text = "rate_limits: {store: 'redis://:${REDIS_PASSWORD}@redis:6379/0'}\n"
    config = parse_config(text, env={"REDIS_PASSWORD_FILE": file})
    assert config.rate_limits.store == "redis://:0123abcd@redis:6379/0"


def test_both_the_variable_and_its_file_is_a_problem(tmp_path: Path) -> None:
    file = write_secret(tmp_path / "jwt_secret", "f" * 40)
    env = {"JWT_SECRET": "e" * 40, "JWT_SECRET_FILE": file}
    assert problems_of(JWT_CONFIG, env) == [
        "auth.jwt.secret: both JWT_SECRET and JWT_SECRET_FILE are set; keep one"
    ]


def test_unreadable_or_empty_file_is_a_problem_naming_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    assert problems_of(JWT_CONFIG, {"JWT_SECRET_FILE": missing}) == [
        f"auth.jwt.secret: cannot read JWT_SECRET_FILE={missing}: No such file or directory"
    ]
    empty = write_secret(tmp_path / "empty", "\n")
    assert problems_of(JWT_CONFIG, {"JWT_SECRET_FILE": empty}) == [
        f"auth.jwt.secret: JWT_SECRET_FILE={empty} is empty"
    ]


async def test_check_reads_the_file_and_never_prints_the_secret(tmp_path: Path) -> None:
    short = "tooshort-secret-value"  # refused: HS secrets need 32 bytes
    config = tmp_path / "gateway.yaml"
    config.write_text(JWT_CONFIG)
    env = {"JWT_SECRET_FILE": write_secret(tmp_path / "jwt_secret", short)}
    code, out, err = await run_cli("check", "--config", str(config), env=cli_env(**env))
    assert code == 2
    assert "auth.jwt.secret" in out
    assert short not in out + err


def token(secret: str) -> str:
    claims = {"sub": "alice", "roles": ["user"], "exp": int(time.time()) + 300}
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_reload_rereads_a_rotated_secret_file(tmp_path: Path, fake: FakeOllama) -> None:
    old, new = "o" * 40, "n" * 40
    secret_file = tmp_path / "jwt_secret"
    store = f"redis://:${{REDIS_PASSWORD}}@127.0.0.1:{free_port()}/0"
    password_file = tmp_path / "redis_password"
    config = {
        "upstream": {"url": fake.url},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": "${JWT_SECRET}"}},
        "rate_limits": {"store": store},
        "roles": {"user": {"models": ["*"]}, "admin": {"models": ["*"]}},
    }
    env = {
        "JWT_SECRET_FILE": write_secret(secret_file, old + "\n"),
        "REDIS_PASSWORD_FILE": write_secret(password_file, "first-password-0001\n"),
    }
    async with gateway_process(config, tmp_path, env=env) as gw, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {token(old)}"}
        async with http.get(f"{gw.url}/healthz", headers=headers) as resp:
            assert resp.status == 200
        async with http.get(f"{gw.url}/api/version", headers=headers) as resp:
            assert resp.status == 200

        write_secret(secret_file, new + "\n")
        write_secret(password_file, "second-password-0002\n")
        await gw.reload()
        async with http.get(f"{gw.url}/api/version", headers=headers) as resp:
            assert resp.status == 401  # signed with the old secret
        headers = {"Authorization": f"Bearer {token(new)}"}
        async with http.get(f"{gw.url}/api/version", headers=headers) as resp:
            assert resp.status == 200
        # The store is restart-only: the reload says so, without the passwords.
        await gw.wait_line(r"rate_limits\.store changed to 'redis://:\*\*\*@127\.0\.0\.1")
    output = gw.output
    for leaked in (old, new, "first-password-0001", "second-password-0002"):
        assert leaked not in output
