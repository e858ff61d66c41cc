"""Helpers for the operations tests: a real `python -m gateway serve` process, certificates.

`GatewayProcess` starts the gateway as a user would, reads the address it prints, collects
its stdout and stderr line by line (so a chatty log never fills a pipe), lets a test wait for
a log line, and is always killed in teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0
ADDRESS_LINE = re.compile(r"ollama-gateway listening on (https?://\S+)")


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a gateway process: ours, minus anything that would steer it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA", "GATEWAY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    url: str = ""
    lines: list[str] = field(default_factory=list)  # stdout and stderr, in arrival order
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def host_port(self) -> str:
        return self.url.split("://", 1)[1]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_line(self, pattern: str, *, after: int = 0, wait_s: float = 10.0) -> str:
        """The first output line from index `after` on matching `pattern` (a regex)."""
        regex = re.compile(pattern)
        seen = after

        async def scan() -> str:
            nonlocal seen
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if regex.search(line):
                        return line
                if self._readers and all(r.done() for r in self._readers):
                    raise AssertionError(f"gateway exited before {pattern!r}:\n{self.output}")
                self._changed.clear()
                await self._changed.wait()

        try:
            return await asyncio.wait_for(scan(), wait_s)
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output}") from None

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    async def wait_exit(self, wait_s: float = 10.0) -> int:
        code = await asyncio.wait_for(self.proc.wait(), wait_s)
        await asyncio.gather(*self._readers)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def start_gateway(*args: str, env: dict[str, str] | None = None) -> GatewayProcess:
    """`python -m gateway serve ARGS`; returns once it printed its address."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        *args,
        cwd=REPO,
        env=env or cli_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    gw = GatewayProcess(proc)
    assert proc.stdout is not None and proc.stderr is not None
    gw._readers = [
        asyncio.create_task(gw._read(proc.stdout)),
        asyncio.create_task(gw._read(proc.stderr)),
    ]
    try:
        line = await gw.wait_line(ADDRESS_LINE.pattern, wait_s=START_TIMEOUT)
    except BaseException:
        await gw.kill()
        raise
    match = ADDRESS_LINE.search(line)
    assert match
    gw.url = match.group(1)
    return gw


@contextlib.asynccontextmanager
async def running_gateway(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[GatewayProcess]:
    gw = await start_gateway(*args, env=env)
    try:
        yield gw
    finally:
        await gw.kill()


async def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, wait_s: float = 20.0
) -> tuple[int, str, str]:
    """`python -m gateway ARGS` to completion -> (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        cwd=REPO,
        env=env or cli_env(),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- certificates, made in the test with `cryptography` -----------------------------------


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    pem: bytes  # the certificate, for a client to trust

    @property
    def tls(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


def make_certificate(
    directory: Path, name: str = "gateway", common_name: str = "localhost"
) -> CertFiles:
    """A self-signed certificate for localhost and 127.0.0.1 (EC P-256: fast to make)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return CertFiles(cert_path, key_path, pem)


# --- credentials ------------------------------------------------------------------------------


def password_hash(password: str) -> str:
    """A bcrypt hash at the lowest cost: the real scheme, fast enough for tests."""
    from gateway.auth.hashes import passlib_hash

    return str(passlib_hash.bcrypt.using(rounds=4).hash(password))


def basic(user: str, password: str) -> dict[str, str]:
    import base64

    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}
