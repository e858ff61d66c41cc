"""Several servers under load: slots per server, failover before the first byte, a server
killed mid-stream (real processes), instant-503 cooldown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.keys import CLUSTER, METRICS, SCHEDULER
from gateway.upstreams.registry import Timings
from tests.conftest import REPO, GatewayFactory, RunningGateway, free_port, until
from tests.fake_ollama import FakeOllama
from tests.test_upstreams import Pair, auth, config

SLOW_POLL = Timings(tags_every=300.0, ps_every=300.0, probe_every=0.1)  # failures found by use
MODEL = "llama3.2:latest"


@pytest.fixture
async def two() -> AsyncIterator[Pair]:
    """Two fake Ollamas with the same (default) models."""
    a, b = await FakeOllama().start(), await FakeOllama().start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def start(factory: GatewayFactory, doc: dict[str, Any], timings: Timings) -> RunningGateway:
    gw = await factory(doc, upstream_timings=timings)
    cluster = gw.app[CLUSTER]
    await until(lambda: all(s.catalogue_at for s in cluster.servers.values()))
    return gw


def gen(tag: str) -> dict[str, Any]:
    return {"model": "llama3.2", "prompt": f"request {tag}", "options": {"num_predict": 4}}


async def generate(
    http: aiohttp.ClientSession, gw: RunningGateway, tag: str, user: str = "alice"
) -> tuple[int, bytes]:
    async with http.post(gw.url + "/api/generate", json=gen(tag), headers=auth(user)) as r:
        return r.status, await r.read()


async def test_both_servers_are_used_and_neither_is_overfilled(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    a = await FakeOllama(parallel=2).start()
    b = await FakeOllama(parallel=2).start()
    try:
        gw = await start(gateway_factory, config(a, b), Timings(ps_every=0.2))
        a.hang_after_chunks = b.hang_after_chunks = 1
        tasks = [asyncio.ensure_future(generate(http, gw, f"r{i}")) for i in range(8)]
        await a.wait_for(lambda: a.running(MODEL) == 2)
        await b.wait_for(lambda: b.running(MODEL) == 2)
        await until(lambda: gw.app[SCHEDULER].waiting_total == 4)
        assert a.waiting(MODEL) == b.waiting(MODEL) == 0, "no server's own queue is used"
        a.resume()
        b.resume()
        assert all(status == 200 for status, _ in await asyncio.gather(*tasks))
        assert a.max_running[MODEL] == 2 and b.max_running[MODEL] == 2
        assert len(a.grants) + len(b.grants) == 8
    finally:
        await a.close()
        await b.close()


async def test_a_refused_connection_fails_over_and_marks_the_server_down(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, two: Pair
) -> None:
    a, b = two
    a.loaded, b.loaded = {MODEL}, set()  # gpu1 is preferred ...
    gw = await start(gateway_factory, config(a, b), SLOW_POLL)
    await a.close()  # ... and dies before the gateway notices
    status, body = await generate(http, gw, "x")
    assert status == 200 and b"done" in body
    assert len(b.requests_to("/api/generate")) == 1
    assert not gw.app[CLUSTER].servers["gpu1"].up
    metrics = (await scrape(gw)).splitlines()
    assert any(
        line.startswith("ollama_gateway_upstream_failovers_total")
        and 'upstream="gpu1"' in line
        and line.endswith(" 1.0")
        for line in metrics
    )


async def scrape(gw: RunningGateway) -> str:
    from prometheus_client import generate_latest

    return generate_latest(gw.app[METRICS].registry).decode()


async def test_an_instant_503_cools_the_server_down_and_another_answers(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, two: Pair
) -> None:
    a, b = two
    a.loaded, b.loaded = {MODEL}, set()
    gw = await start(gateway_factory, config(a, b), SLOW_POLL)
    busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
    a.status_override["/api/generate"] = (503, busy)
    for i in range(3):
        status, _ = await generate(http, gw, f"x{i}")
        assert status == 200
    assert len(a.requests_to("/api/generate")) == 1, "cooling down: not asked again"
    assert len(b.requests_to("/api/generate")) == 3
    assert gw.app[CLUSTER].servers["gpu1"].up, "busy is not down"


async def test_a_model_gone_from_one_server_is_served_by_another(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, two: Pair
) -> None:
    a, b = two
    a.loaded, b.loaded = {MODEL}, set()
    gw = await start(gateway_factory, config(a, b), SLOW_POLL)
    del a._models[MODEL]  # `ollama rm` on the box: the catalogue is stale
    status, _ = await generate(http, gw, "x")
    assert status == 200 and len(b.requests_to("/api/generate")) == 1
    await until(lambda: MODEL not in gw.app[CLUSTER].servers["gpu1"].installed)


async def test_management_never_fails_over(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, two: Pair
) -> None:
    a, b = two
    gw = await start(gateway_factory, config(a, b), SLOW_POLL)
    await a.close()
    async with http.post(
        gw.url + "/upstreams/gpu1/api/pull",
        json={"model": "mistral", "stream": False},
        headers=auth("root"),
    ) as response:
        assert response.status == 502
    assert not b.requests_to("/api/pull")


class FakeProcess:
    """A fake Ollama in its own process, so it can be SIGKILLed like a dying box."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process, self.url = process, url

    @classmethod
    async def start(cls, *args: str) -> FakeProcess:
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.fake_ollama",
            "--port",
            str(port),
            *args,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"listening on" in line, line
        return cls(process, f"http://127.0.0.1:{port}")

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
async def boxes() -> AsyncIterator[tuple[FakeProcess, FakeProcess]]:
    args = ("--chunks", "20", "--chunk-delay", "0.05", "--parallel", "2")
    a = await FakeProcess.start(*args)
    b = await FakeProcess.start(*args)
    try:
        yield a, b
    finally:
        await a.kill()
        await b.kill()


async def test_a_server_killed_under_load_loses_no_request_that_had_not_started(
    gateway_factory: GatewayFactory,
    http: aiohttp.ClientSession,
    boxes: tuple[FakeProcess, FakeProcess],
) -> None:
    a, b = boxes
    doc = config(a, b)  # type: ignore[arg-type]
    gw = await start(gateway_factory, doc, SLOW_POLL)

    async def stream(i: int) -> tuple[str, int]:
        """(what happened, records received): completed, cut (after bytes), or refused."""
        records = 0
        try:
            async with http.post(
                gw.url + "/api/generate", json={**gen(str(i)), "options": {}}, headers=auth("alice")
            ) as response:
                if response.status != 200:
                    return f"status {response.status}", 0
                async for line in response.content:
                    records += 1
                    if json.loads(line).get("done"):
                        return "completed", records
            return "ended without done", records
        except aiohttp.ClientPayloadError:
            return "cut", records

    tasks = [asyncio.ensure_future(stream(i)) for i in range(10)]
    await until(lambda: gw.app[SCHEDULER].waiting_total == 6, within=10)  # 2 + 2 running
    await asyncio.sleep(0.2)  # a few records flow on both (the state under test)
    await a.kill()
    results = await asyncio.gather(*tasks)
    outcomes = [r[0] for r in results]
    assert set(outcomes) <= {"completed", "cut"}, outcomes
    cut = [r for r in results if r[0] == "cut"]
    assert len(cut) <= 2, "only the streams flowing on the killed box are cut"
    assert all(records > 0 for _, records in cut), "cut only after bytes reached the client"
    assert outcomes.count("completed") >= 8
    assert not gw.app[CLUSTER].servers["gpu1"].up


async def test_a_burst_does_not_cold_load_the_model_on_every_box(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, two: Pair
) -> None:
    a, b = two
    a.loaded = b.loaded = set()  # cold everywhere
    gw = await start(gateway_factory, config(a, b), SLOW_POLL)
    a.hang_after_chunks = b.hang_after_chunks = 1
    first = asyncio.ensure_future(generate(http, gw, "r0"))
    await until(lambda: len(a.requests_to("/api/generate")) == 1)
    second = asyncio.ensure_future(generate(http, gw, "r1"))
    # gpu1 is loading it and has a free slot: the second goes there too, not to cold gpu2.
    await until(lambda: len(a.requests_to("/api/generate")) == 2)
    assert not b.requests_to("/api/generate")
    a.resume()
    assert [s for s, _ in await asyncio.gather(first, second)] == [200, 200]


async def test_a_user_keeps_to_the_server_it_used_last(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, two: Pair
) -> None:
    a, b = two
    doc = config(a, b)
    for item in doc["upstreams"]:
        item["slots"] = 1
    gw = await start(gateway_factory, doc, SLOW_POLL)  # both have it loaded
    a.hang_after_chunks = 1
    held = asyncio.ensure_future(generate(http, gw, "bob-0", user="llamas"))
    await until(lambda: len(a.requests_to("/api/generate")) == 1)
    a.hang_after_chunks = None
    assert (await generate(http, gw, "alice-0"))[0] == 200  # gpu1 busy: gpu2
    assert len(b.requests_to("/api/generate")) == 1
    a.resume()
    await held
    for i in range(3):  # both free and loaded now: alice stays on gpu2 (its prompt cache)
        assert (await generate(http, gw, f"alice-{i + 1}"))[0] == 200
    assert len(b.requests_to("/api/generate")) == 4
    assert len(a.requests_to("/api/generate")) == 1
