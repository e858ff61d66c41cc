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


# ---------------------------------------------------------------- fairness (issue 11)


async def _fairness_smoke(tmp_path: Path, *extra: str) -> str:
    """bench/fairness.py --smoke: its report, checked to have every table filled with numbers."""
    out = tmp_path / "fairness.md"
    argv = [sys.executable, str(REPO / "bench" / "fairness.py"), "--smoke", "--silent"]
    argv += ["--out", str(out), *extra]
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
    assert report in output.decode()

    newcomer = _rows(report, "Newcomer")
    assert [r[0] for r in newcomer] == ["gateway", "direct"]
    for row in newcomer:
        sent, answered = int(row[1]), int(row[2])
        assert sent >= 3 and answered == sent, row  # every B request answered in full
        assert float(row[3].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0, row
        assert int(row[7]) > 0 and row[8] == "0; 0", row  # A's streams ran, nothing failed
        assert row[9] == "1", row  # the upstream never ran more than its one slot

    share = _rows(report, "Weighted share")
    assert [(r[0], r[1]) for r in share] == [("bench-light", "1"), ("bench-heavy", "3")]
    assert all(int(r[2].replace(",", "")) > 0 and r[4] == "0" for r in share), share

    cost = _rows(report, "Scheduler cost")
    assert [r[0] for r in cost] == ["slots: 0", "slots: 4"]
    assert all(int(r[1]) == 100 and r[2] == "0" and float(r[3].replace(",", "")) > 0 for r in cost)

    verdicts = _rows(report, "Targets")
    assert len(verdicts) == 5
    assert all(re.fullmatch(r"-?[\d,.]+( ms| µs|x)?", r[1]) for r in verdicts), verdicts
    return report


async def test_bench_fairness_smoke(tmp_path: Path) -> None:
    """bench/fairness.py --smoke against the real scheduler: every target gets a verdict
    (timing targets are not asserted here), and the gateway keeps Ollama's own queue empty."""
    report = await _fairness_smoke(tmp_path)
    verdicts = _rows(report, "Targets")
    assert all(r[3] in ("PASS", "FAIL") for r in verdicts), verdicts
    newcomer = {r[0]: r for r in _rows(report, "Newcomer")}
    assert newcomer["gateway"][10] == "0"  # never more than `slots` sent upstream
    assert newcomer["direct"][10] != "0"  # ... while straight to it, A's backlog queues there
    assert re.fullmatch(r"[\d,.]+", newcomer["gateway"][6]), newcomer  # Server-Timing queue


# ---------------------------------------------------------------- upstreams (issue 12)


async def test_bench_upstreams_smoke(tmp_path: Path) -> None:
    """bench/upstreams.py --smoke: the routing-cost table filled with numbers for every load,
    and the failover run, with one upstream SIGKILLed mid-run, lost no request (deterministic:
    a request that had not started streaming is failed over). The CPU target is not asserted."""
    out = tmp_path / "upstreams.md"
    argv = [sys.executable, str(REPO / "bench" / "upstreams.py"), "--smoke", "--silent"]
    argv += ["--out", str(out)]
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
    assert report in output.decode()

    cost = _rows(report, "Routing cost")
    assert len(cost) == 4, cost
    for row in cost:
        one, two = (int(n.replace(",", "")) for n in row[1].split(" / "))
        assert one == two == 60 and row[2] == "0", row  # 2 blocks of 30 each, no error
        assert all(float(row[i].replace(",", "")) > 0 for i in (3, 4, 6, 7)), row
        assert re.match(r"[\d.]+ \(", row[5]), row

    failover = _rows(report, "Failover")
    assert [r[0] for r in failover] == ["streamed", "non-streamed"], failover
    for row in failover:
        sent, completed, lost = (int(row[i]) for i in (1, 2, 3))
        assert sent > 10 and completed > 0, row
        assert lost == 0, report  # the target, asserted: no request lost to the dead server
        assert row[5] == "0", report  # nothing replayed: every completed stream is whole
        after_ok, after_all = (int(n) for n in row[7].split(" / "))
        assert after_all > 0 and after_ok == after_all, row  # the survivor took the rest
    # Non-streamed answers in flight at the kill had sent nothing yet: never cut.
    assert failover[1][4] == "0 (0)", failover
    per_server = report.split("Requests per server", 1)[1].split("\n", 1)[0]
    assert "fast-a: " in per_server and "fast-b: " in per_server  # both served requests

    verdicts = _rows(report, "Targets")
    assert len(verdicts) == 6 and all(r[3] in ("PASS", "FAIL") for r in verdicts), verdicts
    assert verdicts[-2][1:] == ["0", "0", "PASS"], verdicts  # requests lost
    assert verdicts[-1][1:] == ["0", "0", "PASS"], verdicts  # answers replayed
