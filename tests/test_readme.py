"""README.md stays true: its commands run, its reference matches the code, its links exist."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from gateway.cli import build_parser
from gateway.config_doc import BEGIN, END, reference
from tests.conftest import REPO, gateway_process, require_binary, run_command
from tests.fake_ollama import FakeOllama

README = (REPO / "README.md").read_text()


def shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def test_config_reference_is_generated_from_the_dataclasses() -> None:
    start, end = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:end] == reference(), "run: python -m gateway.config_doc"


def test_ci_runs_the_readme_test_command() -> None:
    extract = (
        "sed -n '/<!-- test-command -->/,/<!-- \\/test-command -->/p' README.md"
        " | grep -v '^<!--' | grep -v '^```' | sed '/^\\s*$/d'"
    )
    command = subprocess.run(
        ["bash", "-c", extract], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert command == ".venv/bin/pip install -q '.[test]' && .venv/bin/pytest -q".join(
        ["python3 -m venv .venv && ", ""]
    )
    assert "test-command" in (REPO / ".ci" / "run").read_text()


def test_every_cli_command_in_readme_exists() -> None:
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    named = set(re.findall(r"`(?:\.venv/bin/)?ollama-gateway ([a-z][a-z-]+)", README))
    named |= {m for b in shell_blocks() for m in re.findall(r"ollama-gateway ([a-z][a-z-]+)", b)}
    assert named, "README names no commands"
    assert named <= set(choices), named - set(choices)


def test_every_linked_file_exists() -> None:
    for target in re.findall(r"\]\(((?:docs|deploy|config|bench)/[^)#]+)", README):
        assert (REPO / target).exists(), target
    for path in re.findall(r"`((?:deploy|config|bench)/[\w./-]+)`", README):
        assert (REPO / path).exists(), path


async def test_quick_start_commands_work_as_written(fake: FakeOllama, tmp_path: Path) -> None:
    """The README's run command (minus the install) and its first curl, against a fake Ollama."""
    curl = require_binary("curl")
    run_line = next(b for b in shell_blocks() if "ollama-gateway serve" in b).strip()
    serve = run_line.split("&& ")[-1]
    assert serve == ".venv/bin/ollama-gateway serve --config config/gateway.yaml"
    config = Path(shlex.split(serve)[-1])  # relative: the process runs in the repository
    env = {"GATEWAY_LISTEN": "127.0.0.1:0", "OLLAMA_URL": fake.url}
    async with gateway_process(config, tmp_path, env=env) as gw:
        assert gw.url.startswith("http://127.0.0.1:"), gw.output
        first = next(b for b in shell_blocks() if b.startswith("curl -u demo"))
        first = first.replace("http://127.0.0.1:8080", gw.url).replace("\\\n", " ")
        code, out, err = await run_command(curl, "-sS", *shlex.split(first)[1:])
        assert code == 0, err
        records = [json.loads(x) for x in out.splitlines()]
        assert records[-1]["done"] is True, out
        assert fake.requests_to("/api/chat")[-1].json["messages"][0]["content"] == "Hello!"
        assert await gw.stop() == 0
