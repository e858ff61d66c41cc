"""HTTPS: `tls: {cert, key}` serves TLS 1.2+ only; a reload picks up a renewed certificate."""

from __future__ import annotations

import asyncio
import json
import ssl
import warnings
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import gateway_process
from tests.fake_ollama import FakeOllama
from tests.ops_support import CertFiles, make_certificate, write_config

PUBLIC_ROUTES = [{"path": "/api/generate", "methods": ["POST"], "public": True}]


def client_context(trust: CertFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=trust.pem.decode())
    return context


def old_protocol_client(trust: CertFiles, newest: ssl.TLSVersion) -> ssl.SSLContext:
    """A client willing to speak TLS 1.0 up to `newest`, with any cipher."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=trust.pem.decode())
    with warnings.catch_warnings():  # the old versions are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = newest
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


async def handshake(host_port: str, context: ssl.SSLContext) -> str:
    """Open a TLS connection; -> the negotiated protocol version."""
    host, port = host_port.rsplit(":", 1)
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=context, server_hostname="localhost"), 5
    )
    try:
        version = writer.get_extra_info("ssl_object").version()
        assert isinstance(version, str)
        return version
    finally:
        writer.close()


async def test_https_with_a_certificate_made_here(tmp_path: Path, fake: FakeOllama) -> None:
    cert = make_certificate(tmp_path)
    config = write_config(
        tmp_path / "gateway.yaml",
        {
            "upstream": {"url": fake.url},
            "routes": PUBLIC_ROUTES,
            "tls": cert.tls,
        },
    )
    async with gateway_process(config, tmp_path, "--listen", "127.0.0.1:0") as gw:
        assert gw.url.startswith("https://127.0.0.1:")
        connector = aiohttp.TCPConnector(ssl=client_context(cert))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(f"{gw.url}/healthz") as resp:
                assert resp.status == 200
            body = {"model": "llama3.2", "prompt": "hi"}
            async with http.post(f"{gw.url}/api/generate", json=body) as resp:
                assert resp.status == 200
                records = [json.loads(line) async for line in resp.content if line.strip()]
            assert records[-1]["done"] is True
            assert len(records) == fake.chunks + 1

        # An unverified client is refused: the certificate is checked, not just present.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get(f"{gw.url}/healthz")
        # Plain HTTP to the TLS port gets no HTTP answer.
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://{gw.host_port}/healthz")


async def test_tls_1_1_is_refused_and_1_2_accepted(tmp_path: Path) -> None:
    cert = make_certificate(tmp_path)
    config = write_config(tmp_path / "gateway.yaml", {"tls": cert.tls})
    async with gateway_process(config, tmp_path, "--listen", "127.0.0.1:0") as gw:
        for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await handshake(gw.host_port, old_protocol_client(cert, old))
        # The same permissive client gets in once it may offer TLS 1.2: the server refused.
        version = await handshake(gw.host_port, old_protocol_client(cert, ssl.TLSVersion.TLSv1_2))
        assert version == "TLSv1.2"
        assert await handshake(gw.host_port, client_context(cert)) == "TLSv1.3"


def corrupt(path: Path) -> None:
    path.write_text("not a key\n")


async def test_reload_picks_up_a_renewed_certificate(tmp_path: Path) -> None:
    old = make_certificate(tmp_path)
    config = write_config(tmp_path / "gateway.yaml", {"tls": old.tls})
    async with gateway_process(config, tmp_path, "--listen", "127.0.0.1:0") as gw:
        await handshake(gw.host_port, client_context(old))

        new = make_certificate(tmp_path)  # renewed in place, as certbot does
        assert new.pem != old.pem
        await gw.reload(r"config reloaded .*generation 1")
        await handshake(gw.host_port, client_context(new))
        with pytest.raises(ssl.SSLCertVerificationError):
            await handshake(gw.host_port, client_context(old))

        # A broken key file is refused as a whole: the running certificate stays.
        corrupt(new.key)
        await gw.reload(r"reload refused: tls: cannot load the certificate")
        await gw.wait_line(r"still serving generation 1")
        await handshake(gw.host_port, client_context(new))
