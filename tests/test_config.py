"""Config loading: typed parsing, env expansion, every problem listed with its key path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import GatewayConfig, Secret
from gateway.config_load import ConfigError, load_config, parse_config
from tests.conftest import REPO, run_cli


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, env=env or {})
    return [str(p) for p in info.value.problems]


def test_empty_file_gives_safe_defaults() -> None:
    config = parse_config("", env={})
    assert isinstance(config, GatewayConfig)
    assert config.listen == "127.0.0.1:8080"
    assert config.upstream.url == "http://127.0.0.1:11434"
    assert config.routes is None  # the built-in table applies
    assert config.metrics.public is False


def test_example_config_is_valid() -> None:
    config = load_config(REPO / "config" / "gateway.yaml")
    assert config.upstream.first_byte_timeout == 900
    assert "demo" in config.auth.users


def test_env_expansion_with_defaults() -> None:
    text = "listen: ${LISTEN:-127.0.0.1:9000}\nupstream: {url: '${URL}'}\n"
    config = parse_config(text, env={"URL": "http://10.0.0.5:11434"})
    assert config.listen == "127.0.0.1:9000"
    assert config.upstream.url == "http://10.0.0.5:11434"


def test_missing_env_variable_is_a_problem_with_its_path() -> None:
    assert problems_of("upstream: {url: '${NOPE}'}\n") == [
        "upstream.url: environment variable NOPE is not set"
    ]


def test_secrets_are_masked_in_repr() -> None:
    text = "auth: {jwt: {algorithms: [HS256], secret: '${S}'}}\n"
    config = parse_config(text, env={"S": "x" * 40})
    assert config.auth.jwt is not None and isinstance(config.auth.jwt.secret, Secret)
    assert "x" * 40 not in repr(config)
    assert config.auth.jwt.secret.reveal() == "x" * 40


def test_every_problem_is_listed_with_its_key_path() -> None:
    text = """
listn: 1.2.3.4:80
upstream: {url: ftp://x, read_timeout: fast, connect_timeout: -1, extra: 1}
auth:
  users:
    bob: {roles: [wizard]}
metrics: {public: "yes"}
routes:
  - {path: api, public: true, roles: [user]}
  - {path: /x, methods: [FETCH], deny: true}
"""
    found = problems_of(text)
    expected = [
        "listn: unknown key (did you mean 'listen'?)",
        "upstream.read_timeout: must be a number",
        "upstream.connect_timeout: must not be negative",
        "upstream.extra: unknown key",
        "auth.users.bob.password: is required",
        "metrics.public: must be true or false",
        "upstream.url: must be an http:// or https:// URL",
        "routes[0].path: must start with /",
        "routes[0]: needs exactly one of public, authenticated, roles, deny",
        "routes[1].methods: unknown method(s): FETCH",
    ]
    for item in expected:
        assert any(p.startswith(item) for p in found), (item, found)


def test_unknown_role_reference_is_an_error() -> None:
    found = problems_of("routes: [{path: /api/chat, roles: [wizards]}]\n")
    assert found == ["routes[0].roles: unknown role 'wizards' (declare it under `roles`)"]


def test_yaml_syntax_error_names_the_line() -> None:
    found = problems_of("listen: [unclosed\nupstream: {}\n")
    assert len(found) == 1 and "line" in found[0]


@pytest.mark.parametrize(
    ("listen", "ok"),
    [
        ("127.0.0.1:8080", True),
        ("[::1]:8080", True),
        (":8080", True),
        ("8080", False),
        ("host:99999", False),
    ],
)
def test_listen_address_forms(listen: str, ok: bool) -> None:
    text = f"listen: '{listen}'\n"
    if ok:
        assert parse_config(text, env={}).listen == listen
    else:
        assert problems_of(text)[0].startswith("listen:")


async def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("listen: 127.0.0.1:8080\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\nupstrem: {}\n")
    (ok, _, ok_err), (failed, out, err) = await asyncio.gather(
        run_cli("check", "--config", str(good)), run_cli("check", "--config", str(bad))
    )
    assert ok == 0, ok_err
    assert failed == 2
    lines = out.splitlines()
    assert "listen: must be HOST:PORT (IPv6 as [::1]:PORT)" in lines
    assert "upstrem: unknown key (did you mean 'upstream'?)" in lines
    assert "Traceback" not in err
