"""The benchmark harness in a tiny configuration, so bench/ cannot rot unnoticed.

Runs bench/run.py --smoke for real (fast upstream, nginx, the gateway as `python -m gateway
serve` with Basic credentials, wrk when installed) and checks the report has every row and
that each row measured real, successful traffic. Performance targets are not asserted here.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from tests.conftest import REPO, require_binary

SMOKE_TIME_LIMIT = 60.0  # normally ~8 s; the bound only stops a hung run


def _rows(report: str, section: str) -> list[list[str]]:
    """The data rows of the markdown table under the `## section...` heading."""
    block = report.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ")]
    return [[cell.strip() for cell in ln.strip("|").split("|")] for ln in lines[1:]]


async def test_bench_smoke_run_produces_every_row(tmp_path: Path) -> None:
    require_binary("nginx")
    require_binary("wrk")  # the wrk path and its Lua script are what the real bench uses
    out = tmp_path / "smoke.md"
    argv = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--smoke",
        "--loops",
        "uvloop",
        "--chunk-delay-ms",
        "2",
        "--silent",
        "--out",
        str(out),
    ]
    argv += ["--load-client", "wrk"]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), SMOKE_TIME_LIMIT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, output.decode()[-3000:]
    report = out.read_text()
    assert report in output.decode()  # printed and written alike

    targets = ["direct", "nginx", "gateway/uvloop"]
    tags = _rows(report, "GET /api/tags")
    assert [(r[0], r[1], r[2]) for r in tags] == [
        ("1", "direct", "none"),
        ("1", "nginx", "apr1"),
        ("1", "gateway/uvloop", "apr1"),
    ]
    for row in tags:
        assert row[3] != "invalid" and float(row[3].replace(",", "")) > 0, row
        assert row[7] == "0", row  # no non-2xx answers, no socket errors

    streams = _rows(report, "Streams")
    assert [(r[0], r[1], r[2]) for r in streams] == [("1", t, "1/1") for t in targets]
    for row in streams:
        assert float(row[5]) > 0, row  # per-chunk latency was measured from the stamps

    idle = _rows(report, "20 idle streams")
    assert [(r[0], r[1]) for r in idle] == [("nginx", "20/20"), ("gateway/uvloop", "20/20")]
    assert all(float(r[3]) > 0 for r in idle)

    verdicts = _rows(report, "Targets")
    assert len(verdicts) == 6 and {r[1] for r in verdicts} == {"gateway/uvloop"}
    assert all(re.fullmatch(r"PASS|FAIL|n/a \(.+\)", r[4]) for r in verdicts), verdicts
