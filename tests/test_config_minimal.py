"""`check` over a minimal config per feature: a default is judged only where it applies.

Each config below names only its own feature and declares no role called `user` or
`admin`, so any default that is validated while its feature is off (htpasswd roles without
an htpasswd file, metrics roles with metrics off or public, lockout keys with the lockout
off...) would make `check` fail over a key the author never wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.auth.hashes import passlib_hash
from gateway.cli import main

HASH = passlib_hash.bcrypt.using(rounds=4).hash("pw")
ONLY_STAFF = {"staff": {"models": ["*"]}}
KEY = {"name": "ci", "sha256": hashlib.sha256(b"k").hexdigest(), "roles": ["staff"]}
STAFF_USER = {"bob": {"password": HASH, "roles": ["staff"]}}


def _minimal(tmp_path: Path) -> dict[str, dict[str, Any]]:
    htpasswd, cert, key = (tmp_path / name for name in ("htpasswd", "cert.pem", "key.pem"))
    return {
        "empty file": {},
        "users only": {"roles": ONLY_STAFF, "auth": {"users": STAFF_USER}},
        "htpasswd": {
            "roles": ONLY_STAFF,
            "auth": {"htpasswd": str(htpasswd), "htpasswd_roles": ["staff"]},
        },
        "api keys only": {"roles": ONLY_STAFF, "auth": {"api_keys": [KEY]}},
        "jwt only": {"roles": ONLY_STAFF, "auth": {"jwt": {"secret": "s" * 32}}},
        "lockout off": {
            "roles": ONLY_STAFF,
            "auth": {"users": STAFF_USER, "lockout": {"max_failures": 0, "window": 0}},
        },
        "lockout tuned": {
            "roles": ONLY_STAFF,
            "auth": {
                "users": STAFF_USER,
                "lockout": {"max_failures": 3, "window": 30, "address_max_failures": 50},
            },
        },
        "metrics off": {
            "roles": ONLY_STAFF,
            "auth": {"users": STAFF_USER},
            "metrics": {"enabled": False, "path": "metrics", "listen": "nowhere"},
        },
        "metrics public": {
            "roles": ONLY_STAFF,
            "auth": {"users": STAFF_USER},
            "metrics": {"public": True},
        },
        "metrics for a declared role": {
            "roles": ONLY_STAFF,
            "auth": {"users": STAFF_USER},
            "metrics": {"roles": ["staff"]},
        },
        "cors": {"roles": ONLY_STAFF, "cors": {"origins": ["https://app.example"]}},
        "tls": {"roles": ONLY_STAFF, "tls": {"cert": str(cert), "key": str(key)}},
        "redis store": {"roles": ONLY_STAFF, "rate_limits": {"store": "redis://127.0.0.1:1/0"}},
        "routes": {
            "roles": ONLY_STAFF,
            "routes": [{"path": "/api/*", "roles": ["staff"]}],
        },
    }


FEATURES = list(_minimal(Path("/nonexistent")))


@pytest.mark.parametrize("feature", FEATURES)
def test_minimal_config_passes_check(
    feature: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "htpasswd").write_text(f"carol:{HASH}\n")
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_minimal(tmp_path)[feature]))
    code = main(["check", "--config", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.strip().endswith(": ok")


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        # The same defaults still bite where their feature is on.
        ({"auth": {"users": STAFF_USER, "htpasswd": "{htpasswd}"}}, "auth.htpasswd_roles"),
        ({"auth": {"users": STAFF_USER}, "metrics": {"roles": ["ops"]}}, "metrics.roles"),
        ({"auth": {"users": STAFF_USER, "lockout": {"window": 0}}}, "auth.lockout.window"),
        (
            {"auth": {"users": STAFF_USER, "lockout": {"address_max_failures": 5}}},
            "auth.lockout.address_max_failures",
        ),
    ],
)
def test_defaults_still_checked_where_they_apply(
    section: dict[str, Any], problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"carol:{HASH}\n")
    text = yaml.safe_dump({"roles": ONLY_STAFF, **section}).replace("'{htpasswd}'", str(htpasswd))
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == 2
    assert any(line.startswith(f"{problem}:") for line in capsys.readouterr().out.splitlines())
