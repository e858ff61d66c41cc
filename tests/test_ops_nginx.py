"""deploy/nginx-tls.conf: `nginx -t` accepts it, and a real nginx streams through it.

The site file is used as shipped, wrapped in a minimal main config; only the certificate
paths (a self-signed pair made here), the ports and the gateway's address are rewritten.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    REPO,
    GatewayFactory,
    free_port,
    require_binary,
    run_command,
    until,
)
from tests.fake_ollama import FakeOllama
from tests.ops_support import CertFiles, make_certificate

SITE = REPO / "deploy" / "nginx-tls.conf"


def directives(text: str) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def test_site_settings_for_streaming() -> None:
    found = directives(SITE.read_text())
    for expected in (
        "proxy_buffering off;",
        "proxy_request_buffering off;",
        "client_max_body_size 0;",
        "proxy_http_version 1.1;",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "proxy_set_header X-Forwarded-Proto $scheme;",
        "ssl_protocols TLSv1.2 TLSv1.3;",
    ):
        assert expected in found, expected
    timeout = next(d for d in found if d.startswith("proxy_read_timeout"))
    assert int(re.search(r"(\d+)s", timeout).group(1)) >= 600  # type: ignore[union-attr]
    assert "trusted_proxies" in SITE.read_text()  # tells users to believe nginx's header


def nginx_config(
    tmp_path: Path, cert: CertFiles, gateway: str, https_port: int, http_port: int
) -> Path:
    site = SITE.read_text()
    site = site.replace("/etc/ssl/ollama-gateway/fullchain.pem", str(cert.cert))
    site = site.replace("/etc/ssl/ollama-gateway/privkey.pem", str(cert.key))
    site = site.replace("server 127.0.0.1:8080;", f"server {gateway};")
    site = re.sub(r"listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl", site)
    site = re.sub(r"listen 80;", f"listen 127.0.0.1:{http_port};", site)
    site = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", site)  # no IPv6 in every sandbox
    (tmp_path / "site.conf").write_text(site)
    main = tmp_path / "nginx.conf"
    main.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {tmp_path}/access.log;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
""")
    return main


async def test_nginx_accepts_the_site(tmp_path: Path) -> None:
    nginx = require_binary("nginx")
    cert = make_certificate(tmp_path)
    main = nginx_config(tmp_path, cert, "127.0.0.1:8080", free_port(), free_port())
    code, _out, err = await run_command(nginx, "-t", "-c", str(main), "-p", str(tmp_path))
    assert code == 0, err
    assert "test is successful" in err  # nginx -t reports on stderr


@pytest.fixture
async def nginx_in_front(
    tmp_path: Path, gateway_factory: GatewayFactory, fake: FakeOllama
) -> AsyncIterator[tuple[str, CertFiles]]:
    nginx = require_binary("nginx")
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "trusted_proxies": ["127.0.0.1/32"],
            "routes": [{"path": "/api/generate", "methods": ["POST"], "public": True}],
        }
    )
    cert = make_certificate(tmp_path)
    https_port, http_port = free_port(), free_port()
    main = nginx_config(tmp_path, cert, gw.host_port, https_port, http_port)
    proc = await asyncio.create_subprocess_exec(
        nginx,
        "-c",
        str(main),
        "-p",
        str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await until(lambda: accepts(https_port, proc), within=10, interval=0.05)
        yield f"https://127.0.0.1:{https_port}", cert
    finally:
        proc.terminate()
        await proc.wait()


async def accepts(port: int, proc: asyncio.subprocess.Process) -> bool:
    """nginx prints nothing when ready: whether it accepts a connection yet."""
    assert proc.returncode is None, "nginx exited"
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def test_tokens_stream_through_nginx_unbuffered(
    nginx_in_front: tuple[str, CertFiles], fake: FakeOllama
) -> None:
    url, cert = nginx_in_front
    fake.hang_after_chunks = 2  # the upstream sends two records, then stays silent
    context = ssl.create_default_context(cadata=cert.pem.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        body = {"model": "llama3.2", "prompt": "hi"}
        async with http.post(f"{url}/api/generate", json=body) as resp:
            assert resp.status == 200
            # Both records arrive while the generation is still open: nothing buffers them.
            async with asyncio.timeout(5):
                first = json.loads(await resp.content.readline())
                second = json.loads(await resp.content.readline())
            assert (first["response"], second["response"]) == ("tok0 ", "tok1 ")
            assert first["done"] is False and second["done"] is False
            # The client vanishes (a killed process: no TLS goodbye, the socket just closes).
            assert resp.connection is not None and resp.connection.transport is not None
            resp.connection.transport.abort()
    # nginx closes its request to the gateway, which closes its own to Ollama.
    await fake.wait_client_gone()
    assert fake.requests_to("/api/generate")[-1].client_gone
