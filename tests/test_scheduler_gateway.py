"""The fair queue through the real gateway, in front of a fake Ollama that has Ollama's slots.

The fake runs `parallel` requests per model and queues the rest FIFO, like Ollama; the
gateway holds `slots` per model. Dispatch order is read from the fake's grant records, so
the tests observe who Ollama served, in what order, with how many running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.keys import SCHEDULER
from gateway.server import reload_config
from tests.auth_support import FAST_BCRYPT, basic
from tests.conftest import GatewayFactory, RunningGateway, gateway_process, until
from tests.fake_ollama import FakeOllama
from tests.fake_ollama_http import estimate_prompt_tokens

MODEL = "llama3.2:latest"
PASSWORD = "correct horse battery staple"
USERS = ("alice", "bob", "carol", "dave", "vip", "heavy")


@pytest.fixture
async def ollama() -> AsyncIterator[FakeOllama]:
    """A fake Ollama with one slot per model (OLLAMA_NUM_PARALLEL=1), streams held on demand."""
    server = await FakeOllama(parallel=1, usage_from_plan=True).start()
    try:
        yield server
    finally:
        await server.close()


def config(fake: FakeOllama, **extra: Any) -> dict[str, Any]:
    hashed = FAST_BCRYPT.hash(PASSWORD)
    users: dict[str, Any] = {name: {"password": hashed, "roles": ["user"]} for name in USERS}
    users["vip"]["roles"] = ["vip"]
    users["heavy"]["roles"] = ["heavy"]
    doc: dict[str, Any] = {
        "upstream": {"url": fake.url, "slots": 1},
        "auth": {"users": users},
        "roles": {
            "user": {"models": ["*"]},
            "vip": {"models": ["*"], "priority": 10},
            "heavy": {"models": ["*"], "weight": 3},
            "admin": {"models": ["*"]},
        },
    }
    for key, value in extra.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
    return doc


def auth(user: str) -> dict[str, str]:
    return basic(user, PASSWORD)


def body(tag: str, tokens: int = 3, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "llama3.2",
        "prompt": f"request {tag}",
        "stream": stream,
        "options": {"num_predict": tokens},
    }


async def generate(
    http: aiohttp.ClientSession, gw: RunningGateway, user: str, tag: str, tokens: int = 3
) -> tuple[int, bytes, aiohttp.ClientResponse]:
    async with http.post(
        gw.url + "/api/generate", json=body(tag, tokens), headers=auth(user)
    ) as response:
        data = await response.read()
        return response.status, data, response


def served_tags(fake: FakeOllama) -> list[str]:
    """The `tag` of each generation in the order Ollama granted it a slot."""
    return [g.request.json["prompt"].removeprefix("request ") for g in fake.grants]


def in_use(gw: RunningGateway) -> int:
    return sum(used for _key, used, _cap in gw.app[SCHEDULER].slots())


def waiting(gw: RunningGateway) -> int:
    return gw.app[SCHEDULER].waiting_total


async def hold_one(
    http: aiohttp.ClientSession, gw: RunningGateway, fake: FakeOllama, user: str = "carol"
) -> asyncio.Task[Any]:
    """A generation that holds the model's only slot until `fake.resume()`."""
    fake.hang_after_chunks = 1
    task = asyncio.ensure_future(generate(http, gw, user, "hold"))
    await fake.wait_for(lambda: fake.running(MODEL) == 1)
    return task


async def test_a_newcomer_is_served_after_one_generation_not_after_a_batch(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(ollama))
    held = await hold_one(http, gw, ollama)
    batch = [asyncio.ensure_future(generate(http, gw, "alice", f"a{i}")) for i in range(8)]
    await until(lambda: waiting(gw) == 8)
    newcomer = asyncio.ensure_future(generate(http, gw, "bob", "b0"))
    await until(lambda: waiting(gw) == 9)
    assert ollama.waiting(MODEL) == 0, "Ollama's own FIFO stays empty"
    ollama.resume()
    results = await asyncio.gather(held, newcomer, *batch)
    assert all(status == 200 for status, _, _ in results)
    order = served_tags(ollama)
    assert order[:3] == ["hold", "a0", "b0"] or order[:2] == ["hold", "b0"], order
    assert ollama.max_running[MODEL] == 1
    assert all(g.wait < 0.5 for g in ollama.grants), "nothing queued inside Ollama"
    assert in_use(gw) == 0 and waiting(gw) == 0


async def test_a_departed_waiter_never_reaches_ollama(
    gateway_factory: GatewayFactory,
    ollama: FakeOllama,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_factory(config(ollama))
    held = await hold_one(http, gw, ollama)
    leaving = asyncio.ensure_future(generate(http, gw, "bob", "gone"))
    await until(lambda: waiting(gw) == 1)
    leaving.cancel()  # the client closes its connection while waiting
    await until(lambda: waiting(gw) == 0)
    ollama.resume()
    await held
    status, _, _ = await generate(http, gw, "bob", "after")
    assert status == 200
    assert "gone" not in served_tags(ollama)
    assert not any(
        r.json and r.json.get("prompt") == "request gone"
        for r in ollama.requests_to("/api/generate")
    )
    metrics = await scrape(http, gw)
    assert 'ollama_gateway_queue_wait_seconds_count{outcome="client_gone"} 1.0' in metrics


async def scrape(http: aiohttp.ClientSession, gw: RunningGateway) -> str:
    from prometheus_client import generate_latest

    from gateway.keys import METRICS

    return generate_latest(gw.app[METRICS].registry).decode()


async def test_priority_goes_first(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(ollama))
    held = await hold_one(http, gw, ollama)
    tasks = [asyncio.ensure_future(generate(http, gw, "alice", f"a{i}")) for i in range(3)]
    await until(lambda: waiting(gw) == 3)
    tasks.append(asyncio.ensure_future(generate(http, gw, "vip", "v0")))
    await until(lambda: waiting(gw) == 4)
    ollama.resume()
    await asyncio.gather(held, *tasks)
    assert served_tags(ollama)[:2] == ["hold", "v0"]


async def test_listings_and_show_answer_while_generations_wait(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(ollama))
    held = await hold_one(http, gw, ollama)
    queued = [asyncio.ensure_future(generate(http, gw, "alice", f"a{i}")) for i in range(3)]
    await until(lambda: waiting(gw) == 3)
    async with asyncio.timeout(2):
        for method, path, payload in (
            ("GET", "/api/tags", None),
            ("GET", "/api/ps", None),
            ("POST", "/api/show", {"model": "llama3.2"}),
            ("GET", "/v1/models", None),
            ("GET", "/api/version", None),
        ):
            async with http.request(
                method, gw.url + path, json=payload, headers=auth("bob")
            ) as response:
                assert response.status == 200, path
                assert "queue" not in response.headers.get("Server-Timing", "")
    assert waiting(gw) == 3
    ollama.resume()
    await asyncio.gather(held, *queued)


async def test_caps_and_timeout_answer_with_retry_after(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(
        config(ollama, scheduler={"max_queue_per_user": 2, "max_queue": 3, "queue_timeout": 1})
    )
    held = await hold_one(http, gw, ollama)
    queued = [asyncio.ensure_future(generate(http, gw, "alice", f"a{i}")) for i in range(2)]
    await until(lambda: waiting(gw) == 2)
    status, data, response = await generate(http, gw, "alice", "a-over")
    assert status == 429 and int(response.headers["Retry-After"]) >= 1
    assert "waiting" in json.loads(data)["error"]
    queued.append(asyncio.ensure_future(generate(http, gw, "bob", "b0")))
    await until(lambda: waiting(gw) == 3)
    status, data, response = await generate(http, gw, "carol", "c-over")
    assert status == 503 and int(response.headers["Retry-After"]) >= 1
    assert "queue is full" in json.loads(data)["error"]
    # Everyone still waiting times out after queue_timeout: 503 naming the cause.
    results = await asyncio.gather(*queued)
    for status, data, response in results:
        assert status == 503 and "waited" in json.loads(data)["error"]
        assert int(response.headers["Retry-After"]) >= 1
    ollama.resume()
    await held
    assert not {"a0", "a1", "b0", "a-over", "c-over"} & set(served_tags(ollama))
    metrics = await scrape(http, gw)
    assert 'ollama_gateway_queue_rejections_total{reason="timeout"} 3.0' in metrics
    assert 'ollama_gateway_queue_rejections_total{reason="user_queue_full"} 1.0' in metrics
    assert 'ollama_gateway_queue_rejections_total{reason="queue_full"} 1.0' in metrics


async def keep_backlogged(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    user: str,
    tokens: int,
    stop: asyncio.Event,
    depth: int = 4,
) -> None:
    """`depth` requests of `user` always waiting: each ends, another is sent."""

    async def loop(worker: int) -> None:
        n = 0
        while not stop.is_set():
            await generate(http, gw, user, f"{user}-{worker}-{n}", tokens)
            n += 1

    await asyncio.gather(*(loop(i) for i in range(depth)))


async def shares(
    gw: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession, plan: dict[str, int]
) -> dict[str, int]:
    """Run every user of `plan` (user -> completion tokens per request) backlogged; the
    tokens (prompt + completion, as the fake reports them) each got over 60 dispatches."""
    fake.chunk_delay = 0.002
    stop = asyncio.Event()
    held = await hold_one(http, gw, fake)
    loops = [asyncio.ensure_future(keep_backlogged(http, gw, u, t, stop)) for u, t in plan.items()]
    await until(lambda: waiting(gw) == 4 * len(plan))
    start = len(fake.grants)
    fake.resume()
    await fake.wait_for(lambda: len(fake.grants) >= start + 60, timeout=30)
    stop.set()
    window = fake.grants[start + 1 : start + 61]
    got = {user: 0 for user in plan}
    for grant in window:
        user = grant.request.json["prompt"].removeprefix("request ").split("-")[0]
        got[user] += plan[user] + estimate_prompt_tokens(grant.request.json)
    await asyncio.gather(held, *loops)
    return got


async def test_weights_share_the_tokens(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    gw = await gateway_factory(config(ollama))
    got = await shares(gw, ollama, http, {"alice": 4, "heavy": 4})
    ratio = got["heavy"] / got["alice"]
    assert 2.5 <= ratio <= 3.5, got


async def test_long_and_short_jobs_share_by_tokens_not_requests(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    ollama.chunks = 16
    gw = await gateway_factory(config(ollama))
    got = await shares(gw, ollama, http, {"alice": 16, "bob": 2})
    ratio = got["alice"] / got["bob"]
    assert 0.6 <= ratio <= 1.6, got


@pytest.mark.parametrize(
    "ending",
    ["completed", "non_stream", "client_gone", "upstream_500", "abort", "timeout", "refused"],
)
async def test_every_ending_gives_the_slot_back(
    gateway_factory: GatewayFactory,
    ollama: FakeOllama,
    http: aiohttp.ClientSession,
    ending: str,
) -> None:
    extra: dict[str, Any] = {}
    if ending == "timeout":
        extra["upstream"] = {"url": ollama.url, "slots": 1, "read_timeout": 0.3}
    if ending == "refused":
        extra["upstream"] = {"url": "http://127.0.0.1:9", "slots": 1, "connect_timeout": 1}
    gw = await gateway_factory(config(ollama, **extra))
    url = gw.url + "/api/generate"
    if ending == "completed":
        assert (await generate(http, gw, "alice", "x"))[0] == 200
    elif ending == "non_stream":
        async with http.post(url, json=body("x", stream=False), headers=auth("alice")) as r:
            assert r.status == 200 and b'"done":true' in await r.read()
    elif ending == "client_gone":
        ollama.hang_after_chunks = 1
        async with http.post(url, json=body("x"), headers=auth("alice")) as r:
            await r.content.readline()
            assert in_use(gw) == 1
        await ollama.wait_client_gone()
    elif ending == "upstream_500":
        ollama.status_override["/api/generate"] = (500, {"error": "boom"})
        assert (await generate(http, gw, "alice", "x"))[0] == 500
    elif ending == "abort":
        ollama.abort_mid_stream_after = 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await generate(http, gw, "alice", "x")
    elif ending == "timeout":
        ollama.hang_after_chunks = 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await generate(http, gw, "alice", "x")
    elif ending == "refused":
        assert (await generate(http, gw, "alice", "x"))[0] == 502
    await until(lambda: in_use(gw) == 0)
    ollama.status_override.clear()
    ollama.abort_mid_stream_after = None
    ollama.resume()
    if ending != "refused":  # the freed slot serves the next request at once
        async with asyncio.timeout(5):
            assert (await generate(http, gw, "bob", "next"))[0] == 200
    assert in_use(gw) == 0 and waiting(gw) == 0


async def test_waiting_counts_towards_concurrency_and_limits_apply_on_arrival(
    gateway_factory: GatewayFactory, ollama: FakeOllama, http: aiohttp.ClientSession
) -> None:
    limited = {"models": ["*"], "limits": {"concurrency": 2}}
    gw = await gateway_factory(config(ollama, roles={"user": limited}))
    held = await hold_one(http, gw, ollama, user="bob")
    waiting_one = asyncio.ensure_future(generate(http, gw, "alice", "a0"))
    second = asyncio.ensure_future(generate(http, gw, "alice", "a1"))
    await until(lambda: waiting(gw) == 2)
    status, data, _ = await generate(http, gw, "alice", "a2")
    assert status == 429 and "concurrency" in json.loads(data)["error"]
    assert waiting(gw) == 2, "refused on arrival, never queued"
    ollama.resume()
    await asyncio.gather(held, waiting_one, second)


async def test_reload_applies_new_slots_to_waiting_requests(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    fake = await FakeOllama(parallel=2, usage_from_plan=True).start()
    try:
        gw = await gateway_factory(config(fake))
        held = await hold_one(http, gw, fake)
        queued = [asyncio.ensure_future(generate(http, gw, "alice", f"a{i}")) for i in range(3)]
        await until(lambda: waiting(gw) == 3)
        new = config(fake)
        new["upstream"]["slots"] = 2
        await asyncio.to_thread(Path(gw.config_path).write_text, yaml.safe_dump(new))
        assert await reload_config(gw.app, gw.config_path) is True
        await fake.wait_for(lambda: fake.running(MODEL) == 2)
        assert waiting(gw) == 2, "one more slot: one more dispatched, the rest still queued"
        fake.resume()
        assert all(r[0] == 200 for r in await asyncio.gather(held, *queued))
        assert fake.max_running[MODEL] == 2
    finally:
        await fake.close()


async def test_server_timing_and_access_log_show_the_wait(
    gateway_factory: GatewayFactory,
    ollama: FakeOllama,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway_factory(config(ollama))
    held = await hold_one(http, gw, ollama)
    later = asyncio.ensure_future(generate(http, gw, "bob", "b0"))
    await until(lambda: waiting(gw) == 1)
    await asyncio.sleep(0.2)  # a measurable wait (the quantity under test, not a sync)
    ollama.resume()
    await held
    status, _, response = await later
    assert status == 200
    timings = dict(v.split(";dur=") for v in response.headers.getall("Server-Timing"))
    assert float(timings["queue"]) >= 200
    assert float(timings["gateway"]) < 200, "queue time is not counted as overhead"


async def test_serve_logs_the_slots_in_effect(tmp_path: Path, ollama: FakeOllama) -> None:
    doc = config(ollama)
    doc["upstream"]["model_slots"] = {"*embed*": 1}
    async with gateway_process(doc, tmp_path) as gw:
        line = await gw.wait_line(r"fair queue: 1 slot\(s\) per model")
        assert "*embed*=1" in line and "OLLAMA_NUM_PARALLEL" in line
        status, _, _ = await generate_at(gw.url, "alice")
        assert status == 200


async def generate_at(url: str, user: str) -> tuple[int, bytes, None]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(url + "/api/generate", json=body("p"), headers=auth(user)) as response,
    ):
        return response.status, await response.read(), None
