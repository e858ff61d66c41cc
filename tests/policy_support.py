"""Shared pieces of the policy tests: a config with users, keys and roles; raw HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import re
from typing import Any

from tests import auth_support
from tests.auth_support import FAST_BCRYPT

PASSWORD = "pw"
HASH = FAST_BCRYPT.hash(PASSWORD)
ALICE_KEY = "sk-test-alice-0123456789abcdef"
ROOT_KEY = "sk-test-root-0123456789abcdef"


def basic(user: str, password: str = PASSWORD) -> dict[str, str]:
    return auth_support.basic(user, password)


def policy_config(upstream: str, **extra: Any) -> dict[str, Any]:
    """alice: user; bob: user limited to qwen*; root: admin; carol: admin limited to llama."""
    return {
        "upstream": {"url": upstream},
        "auth": {
            "users": {
                "alice": {"password": HASH, "roles": ["user"]},
                "bob": {"password": HASH, "roles": ["user"], "models": ["qwen*"]},
                "root": {"password": HASH, "roles": ["admin"]},
                "carol": {"password": HASH, "roles": ["admin"], "models": ["llama3.2:*"]},
            },
            "api_keys": [
                {
                    "name": "alice-key",
                    "user": "alice",
                    "roles": ["user"],
                    "sha256": hashlib.sha256(ALICE_KEY.encode()).hexdigest(),
                },
                {
                    "name": "root-key",
                    "user": "root",
                    "roles": ["admin"],
                    "sha256": hashlib.sha256(ROOT_KEY.encode()).hexdigest(),
                },
            ],
        },
        **extra,
    }


STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) ", re.MULTILINE)


async def raw_exchange(host_port: str, payload: bytes) -> list[int]:
    """Send raw bytes, read until the server closes; the statuses of every response."""
    host, port = host_port.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    return [int(m) for m in STATUS_LINE.findall(data)]


def request_bytes(
    method: str,
    target: bytes | str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    if isinstance(target, str):
        target = target.encode()
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gateway.test"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode())
    if body or method in ("POST", "PUT", "DELETE"):
        lines.append(f"Content-Length: {len(body)}".encode())
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
