"""A Docker engine and Compose for tests/test_ops_docker.py: found, or started when absent.

Under CI=true, an engine that cannot be had fails the run; elsewhere the tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ENGINE_START_S = 90.0  # dockerd's first start sets up its storage and networks


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Docker is required under CI=true (.ci/run installs docker.io): {reason}")
    pytest.skip(reason)


def run(
    *args: str | Path,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 900,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; on failure the assertion carries its output."""
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        input=input_text,
        check=False,
    )
    if check:
        assert result.returncode == 0, (
            f"{' '.join(map(str, args))} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


def _engine_answers() -> bool:
    try:
        return run("docker", "info", check=False, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextmanager
def docker_engine(log_dir: Path) -> Iterator[None]:
    """A running Docker engine; one started here is stopped again afterwards."""
    if shutil.which("docker") is None:
        unavailable("the docker CLI is not installed")
    if _engine_answers():
        yield
        return
    dockerd = shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if Path(p).exists()), None
    )
    if dockerd is None:
        unavailable("no Docker engine answers and dockerd is not installed")
    if os.geteuid() != 0:
        unavailable("no Docker engine answers, and starting dockerd needs root")
    log = (log_dir / "dockerd.log").open("w")
    process = subprocess.Popen(
        [str(dockerd), "--host", "unix:///var/run/docker.sock"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + ENGINE_START_S
        while not _engine_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                unavailable(
                    f"dockerd did not start (exit {process.poll()}):\n"
                    + (log_dir / "dockerd.log").read_text()[-3000:]
                )
            time.sleep(0.5)  # polling a daemon's readiness, with a deadline
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def compose_command() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else `docker-compose` (v1)."""
    if run("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    unavailable("neither `docker compose` nor `docker-compose` is installed")
    raise AssertionError("unreachable")


@dataclass
class Stack:
    """One compose project, driven through the compose CLI with its own environment."""

    compose: list[str]
    project: str
    compose_file: Path
    env: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        command = [*self.compose, "-p", self.project, "-f", str(self.compose_file), *args]
        return run(*command, env=self.env, check=check, timeout=timeout)

    def command(self, *args: str) -> Sequence[str]:
        return [*self.compose, "-p", self.project, "-f", str(self.compose_file), *args]

    def container(self, service: str) -> str:
        container_id = self("ps", "-q", service).stdout.strip()
        assert container_id, f"no container for {service}"
        return container_id

    def logs(self, service: str) -> list[str]:
        result = run("docker", "logs", self.container(service))
        return (result.stdout + result.stderr).splitlines()
