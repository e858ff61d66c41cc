"""Helpers for the authentication tests: a settable clock, hashes, headers."""

from __future__ import annotations

import base64
import time
from typing import Any

from gateway.auth.hashes import passlib_hash
from gateway.keys import STATE

FAST_BCRYPT = passlib_hash.bcrypt.using(rounds=4)  # tests: the real cost only where it matters

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


class FakeClock:
    """Epoch seconds that only move when a test says so."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def authenticator(gateway: Any) -> Any:
    return gateway.app[STATE].current.authenticator


def config(fake: Any, **auth: Any) -> dict[str, Any]:
    """A config dict: `fake` as upstream and the given `auth:` section."""
    return {"upstream": {"url": fake.url}, "auth": auth}
