"""Authentication overhead per request, in microseconds, once credentials are warm.

Each row calls `Authenticator.authenticate(headers, client_ip)` the way the authenticate
stage does. Basic rows hash once (cold: shown separately) and then hit the verified cache;
API keys cost one sha256; a JWT is verified in full once, then cached until its `exp`.

    python -m bench.auth_overhead [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import tempfile
import time
from pathlib import Path

import jwt
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.auth.authenticator import Authenticator
from gateway.auth.hashes import passlib_hash
from gateway.config_load import load_config

SECRET = "bench-hs256-secret-that-is-long-enough-for-sure"
KEY = "ogw_bench-key-0123456789abcdefghijklmnopqrstuvwxyz"


def _basic(user: str, password: str) -> CIMultiDictProxy[str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return CIMultiDictProxy(CIMultiDict({"Authorization": f"Basic {token}"}))


def _bearer(token: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {token}"}))


async def _time(
    auth: Authenticator, headers: CIMultiDictProxy[str], calls: int
) -> tuple[float, float]:
    started = time.perf_counter()
    assert await auth.authenticate(headers, "127.0.0.1") is not None
    cold = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(calls):
        await auth.authenticate(headers, "127.0.0.1")
    return cold * 1e6, (time.perf_counter() - started) / calls * 1e6


async def main(calls: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        htpasswd = Path(tmp) / "htpasswd"
        htpasswd.write_text(f"apr:{passlib_hash.apr_md5_crypt.hash('pw')}\n")
        config_file = Path(tmp) / "gateway.yaml"
        config_file.write_text(
            yaml.safe_dump(
                {
                    "auth": {
                        "users": {"alice": {"password": passlib_hash.bcrypt.hash("pw")}},
                        "htpasswd": str(htpasswd),
                        "api_keys": [
                            {"name": "bench", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}
                        ],
                        "jwt": {"algorithms": ["HS256"], "secret": SECRET},
                    }
                }
            )
        )
        auth = Authenticator.from_config(load_config(config_file))
        token = jwt.encode(
            {"sub": "bench", "roles": ["user"], "exp": int(time.time()) + 3600}, SECRET
        )
        rows = [
            ("basic, bcrypt (12 rounds)", _basic("alice", "pw")),
            ("basic, htpasswd $apr1$", _basic("apr", "pw")),
            ("api key (Bearer)", _bearer(KEY)),
            ("jwt HS256", _bearer(token)),
        ]
        print(f"{'method':<28}{'cold µs':>12}{'warm µs/call':>16}")
        for name, headers in rows:
            cold, warm = await _time(auth, headers, calls)
            print(f"{name:<28}{cold:>12.0f}{warm:>16.2f}")
        await auth.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().calls))
