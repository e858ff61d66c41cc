"""A newcomer's first hour, as README's quick start tells it, with real processes.

The example config (config/gateway.yaml), `serve` with `--listen`/`--upstream`, the printed
address, a first authenticated streamed request with the official client, `check` on a
broken file, a new user added with `hash-password` and taken by a SIGHUP reload, SIGTERM.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import ollama
import yaml

from tests.auth_support import basic
from tests.conftest import REPO, gateway_process, run_cli
from tests.fake_ollama import FakeOllama

EXAMPLE = REPO / "config" / "gateway.yaml"
DEMO_USER, DEMO_PASSWORD = "demo", "change-me"  # as the example's comment says


async def test_quick_start(tmp_path: Path, fake: FakeOllama) -> None:
    config = tmp_path / "gateway.yaml"
    shutil.copy(EXAMPLE, config)  # "copy the example and edit it"

    code, out, err = await run_cli("check", "--config", str(config))
    assert code == 0, out + err

    async with gateway_process(
        config, tmp_path, "--listen", "127.0.0.1:0", "--upstream", fake.url
    ) as gw:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{gw.url}/readyz") as resp:
                assert resp.status == 200  # the upstream (from --upstream) answers
            body = {"model": "llama3.2", "prompt": "hello"}
            async with http.post(f"{gw.url}/api/generate", json=body) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Basic realm=")
                assert "error" in await resp.json()

        # The first real request: the official client, streaming, with the demo user.
        headers = basic(DEMO_USER, DEMO_PASSWORD)
        async with ollama.AsyncClient(host=gw.url, headers=headers) as client:
            stream = await client.generate(model="llama3.2", prompt="hello", stream=True)
            parts = [part async for part in stream]
        assert len(parts) == fake.chunks + 1
        assert parts[-1].done is True
        assert "".join(p.response for p in parts).startswith("tok0")

        # A typo'd copy: `check` exits 2 and lists every problem with its key path.
        broken = tmp_path / "broken.yaml"
        broken.write_text(
            config.read_text()
            .replace("metrics:\n", "metrics:\n  publc: true\n")
            .replace("${OLLAMA_URL:-http://127.0.0.1:11434}", "127.0.0.1:11434")
        )
        # (and, meanwhile, a new user's password hash from `hash-password`)
        (code, out, _err), (hash_code, hashed, hash_err) = await asyncio.gather(
            run_cli("check", "--config", str(broken)),
            run_cli("hash-password", stdin=b"newbie-password\n"),
        )
        assert code == 2
        assert "metrics.publc: unknown key (did you mean 'public'?)" in out
        assert "upstream.url: must be an http:// or https:// URL" in out

        # Add the user, then reload with SIGHUP: no restart.
        assert hash_code == 0, hash_err
        settings = yaml.safe_load(config.read_text())
        settings["auth"]["users"]["newbie"] = {"password": hashed.strip(), "roles": ["user"]}
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        await gw.reload(r"config reloaded from .* \(generation 1\)")

        headers = basic("newbie", "newbie-password")
        async with ollama.AsyncClient(host=gw.url, headers=headers) as newbie:
            reply = await newbie.generate(model="llama3.2", prompt="hi")
        assert reply.done is True

        assert await gw.stop() == 0
