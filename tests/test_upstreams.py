"""Several Ollama servers behind one gateway: routing by model, management targets, merged
listings, health. Two fake Ollamas on their own sockets, the real gateway in front."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.keys import CLUSTER
from gateway.upstreams.registry import Timings
from tests.auth_support import FAST_BCRYPT, basic
from tests.conftest import GatewayFactory, RunningGateway, run_cli, until
from tests.fake_ollama import FakeOllama

PASSWORD = "correct horse battery staple"
Pair = tuple[FakeOllama, FakeOllama]
FAST = Timings(tags_every=30.0, ps_every=0.2, probe_every=0.1, refresh_at_most_every=0.0)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FakeOllama, FakeOllama]]:
    """gpu1 has llama3.2 and qwen2.5; gpu2 has llama3.2 and all-minilm (partial catalogues)."""
    a = await FakeOllama(models=["llama3.2:latest", "qwen2.5:7b"], version="0.33.1").start()
    b = await FakeOllama(models=["llama3.2:latest", "all-minilm:latest"], version="0.32.0").start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def config(a: FakeOllama, b: FakeOllama, **extra: Any) -> dict[str, Any]:
    hashed = FAST_BCRYPT.hash(PASSWORD)
    doc: dict[str, Any] = {
        "upstreams": [
            {"name": "gpu1", "url": a.url, "slots": 2},
            {"name": "gpu2", "url": b.url, "slots": 2},
        ],
        "auth": {
            "users": {
                "root": {"password": hashed, "roles": ["admin"]},
                "alice": {"password": hashed, "roles": ["user"]},
                "llamas": {"password": hashed, "roles": ["llamas"]},
            }
        },
        "roles": {
            "user": {"models": ["*"]},
            "llamas": {"models": ["llama*"]},
            "admin": {"models": ["*"]},
        },
    }
    doc.update(extra)
    return doc


async def start(factory: GatewayFactory, doc: dict[str, Any]) -> RunningGateway:
    gw = await factory(doc, upstream_timings=FAST)
    cluster = gw.app[CLUSTER]
    if cluster.several:  # one server: nothing is learnt in the background
        await until(lambda: all(s.catalogue_at for s in cluster.servers.values()))
    return gw


def auth(user: str) -> dict[str, str]:
    return basic(user, PASSWORD)


async def post(
    http: aiohttp.ClientSession,
    gw: RunningGateway,
    path: str,
    payload: dict[str, Any],
    user: str = "alice",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    async with http.post(
        gw.url + path, json=payload, headers={**auth(user), **(headers or {})}
    ) as response:
        return response.status, await response.read()


async def get(
    http: aiohttp.ClientSession, gw: RunningGateway, path: str, user: str = "alice"
) -> tuple[int, Any]:
    async with http.get(gw.url + path, headers=auth(user)) as response:
        data = await response.read()
        return response.status, json.loads(data) if data else None


def generations(fake: FakeOllama) -> int:
    return len(fake.requests_to("/api/generate"))


async def test_requests_go_to_a_server_that_has_the_model(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    status, _ = await post(http, gw, "/api/generate", {"model": "qwen2.5:7b", "prompt": "x"})
    assert status == 200 and generations(a) == 1 and generations(b) == 0
    status, _ = await post(http, gw, "/api/embed", {"model": "all-minilm", "input": "x"})
    assert status == 200 and len(b.requests_to("/api/embed")) == 1
    status, _ = await post(http, gw, "/api/show", {"model": "all-minilm"})
    assert status == 200 and len(b.requests_to("/api/show")) == 1


async def test_an_unknown_model_is_404_after_one_catalogue_refresh(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    before = len(a.requests_to("/api/tags")), len(b.requests_to("/api/tags"))
    status, data = await post(http, gw, "/api/generate", {"model": "mistral", "prompt": "x"})
    assert status == 404
    assert json.loads(data) == {"error": "model 'mistral:latest' not found"}
    after = len(a.requests_to("/api/tags")), len(b.requests_to("/api/tags"))
    assert after == (before[0] + 1, before[1] + 1)
    assert generations(a) == generations(b) == 0


async def test_a_model_pulled_outside_the_gateway_is_found_after_the_refresh(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    b._add_model("mistral:latest")  # `ollama pull` run on the box itself
    status, _ = await post(http, gw, "/api/generate", {"model": "mistral", "prompt": "x"})
    assert status == 200 and generations(b) == 1


async def test_a_server_with_the_model_loaded_is_preferred(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    a.loaded, b.loaded = set(), {"llama3.2:latest"}
    gw = await start(gateway_factory, config(a, b))
    for _ in range(4):
        status, _ = await post(http, gw, "/api/generate", {"model": "llama3.2", "prompt": "x"})
        assert status == 200
    assert generations(b) == 4 and generations(a) == 0


async def test_models_globs_restrict_a_server(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    doc = config(a, b)
    doc["upstreams"][0]["models"] = ["qwen*"]  # gpu1 serves only qwen, though it has llama3.2
    a.loaded = {"llama3.2:latest"}
    gw = await start(gateway_factory, doc)
    for _ in range(3):
        await post(http, gw, "/api/generate", {"model": "llama3.2", "prompt": "x"})
    assert generations(a) == 0 and generations(b) == 3
    # Naming the server does not get around its `models`.
    pinned = {"X-Ollama-Upstream": "gpu1"}
    status, data = await post(
        http, gw, "/api/generate", {"model": "llama3.2", "prompt": "x"}, headers=pinned
    )
    assert status == 404 and json.loads(data)["error"] == "model 'llama3.2:latest' not found"
    assert generations(a) == 0


# -- model management -------------------------------------------------------------------


async def test_management_without_a_name_is_409_listing_the_names(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    status, data = await post(http, gw, "/api/pull", {"model": "mistral"}, user="root")
    assert status == 409
    message = json.loads(data)["error"]
    assert "gpu1" in message and "gpu2" in message and "X-Ollama-Upstream" in message
    assert not a.requests_to("/api/pull") and not b.requests_to("/api/pull")


async def test_management_goes_to_the_named_server_by_header_or_prefix(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    pull = {"model": "mistral", "stream": False}
    status, _ = await post(
        http, gw, "/api/pull", pull, user="root", headers={"X-Ollama-Upstream": "gpu2"}
    )
    assert status == 200 and len(b.requests_to("/api/pull")) == 1 and not a.requests_to("/api/pull")
    assert "x-ollama-upstream" not in {k.lower() for k in b.requests_to("/api/pull")[0].headers}
    status, _ = await post(http, gw, "/upstreams/gpu1/api/pull", pull, user="root")
    assert status == 200 and len(a.requests_to("/api/pull")) == 1
    assert a.requests_to("/api/pull")[0].path == "/api/pull", "the prefix is not forwarded"
    # The pulled model is routable at once: the catalogue was refreshed after the pull.
    await until(lambda: "mistral:latest" in gw.app[CLUSTER].servers["gpu2"].installed)
    status, _ = await post(http, gw, "/api/generate", {"model": "mistral", "prompt": "x"})
    assert status == 200


async def test_unknown_server_name_is_404_and_policy_judges_the_stripped_path(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    status, data = await post(http, gw, "/upstreams/gpu9/api/pull", {"model": "x"}, user="root")
    assert status == 404 and "gpu9" in json.loads(data)["error"]
    status, data = await post(
        http, gw, "/api/pull", {"model": "x"}, user="root", headers={"X-Ollama-Upstream": "nope"}
    )
    assert status == 404
    # A non-admin is refused the prefixed management path exactly like the plain one.
    for path in ("/upstreams/gpu1/api/pull", "/api/pull", "/UPSTREAMS/gpu1/api/pull"):
        status, _ = await post(http, gw, path, {"model": "x"})
        assert status == 403, path
    assert not a.requests_to("/api/pull") and not b.requests_to("/api/pull")


async def test_prefixed_path_tricks_are_refused(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    for path in (
        "/upstreams/gpu1/../api/pull",
        "/upstreams/gpu1/%2e%2e/api/pull",
        "/upstreams/gpu1//api/pull",
        "/upstreams/gpu1/api%2Fpull",
        "/upstreams/gpu1/upstreams/gpu2/api/pull",
    ):
        async with http.post(gw.url + path, json={"model": "x"}, headers=auth("alice")) as response:
            assert response.status in (400, 403, 404), path
    assert not a.requests_to("/api/pull") and not b.requests_to("/api/pull")


async def test_blob_upload_and_create_land_on_one_server(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    import hashlib

    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    blob = b"GGUF" + b"\0" * 1000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    async with http.post(
        gw.url + f"/upstreams/gpu2/api/blobs/{digest}", data=blob, headers=auth("root")
    ) as response:
        assert response.status in (200, 201)
    create = {"model": "mine", "files": {"m.gguf": digest}, "stream": False}
    status, _ = await post(http, gw, "/upstreams/gpu2/api/create", create, user="root")
    assert status == 200
    assert b.blobs and not a.blobs
    assert b.requests_to("/api/create") and not a.requests_to("/api/create")


# -- merged listings --------------------------------------------------------------------


async def test_tags_list_every_model_once_newest_entry_then_filtered(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    calls = len(a.requests_to("/api/tags"))
    status, listing = await get(http, gw, "/api/tags")
    assert status == 200
    names = [m["name"] for m in listing["models"]]
    assert sorted(names) == ["all-minilm:latest", "llama3.2:latest", "qwen2.5:7b"]
    assert len(a.requests_to("/api/tags")) == calls, "answered from the catalogue"
    # Entries keep Ollama's schema (the fields of the server's own entry).
    _, own = await get_direct(http, b.url + "/api/tags")
    assert set(listing["models"][0]) == set(own["models"][0])
    status, listing = await get(http, gw, "/api/tags", user="llamas")
    assert [m["name"] for m in listing["models"]] == ["llama3.2:latest"]
    status, models = await get(http, gw, "/v1/models", user="llamas")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["llama3.2:latest"]
    assert set(models["data"][0]) == {"id", "object", "created", "owned_by"}
    status, one = await get(http, gw, "/v1/models/qwen2.5:7b")
    assert status == 200 and one["id"] == "qwen2.5:7b"


async def get_direct(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json(content_type=None)


async def test_ps_lists_every_servers_loaded_models_and_version_is_the_lowest(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    a.loaded, b.loaded = {"qwen2.5:7b"}, {"all-minilm:latest", "llama3.2:latest"}
    gw = await start(gateway_factory, config(a, b))
    status, ps = await get(http, gw, "/api/ps")
    assert status == 200
    assert sorted(m["name"] for m in ps["models"]) == [
        "all-minilm:latest",
        "llama3.2:latest",
        "qwen2.5:7b",
    ]
    status, version = await get(http, gw, "/api/version")
    assert status == 200 and version == {"version": "0.32.0"}


# -- health -----------------------------------------------------------------------------


async def test_a_dead_server_is_skipped_then_used_again_once_it_answers(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    cluster = gw.app[CLUSTER]
    port = int(b.url.rsplit(":", 1)[1])
    await b.close()
    await until(lambda: not cluster.servers["gpu2"].up, within=5)
    async with http.get(gw.url + "/readyz") as response:
        ready = await response.json()
        assert response.status == 200 and ready["upstreams"]["gpu2"]["state"] == "down"
    status, data = await post(http, gw, "/api/embed", {"model": "all-minilm", "input": "x"})
    assert status == 503 and "down" in json.loads(data)["error"]
    for _ in range(3):
        status, _ = await post(http, gw, "/api/generate", {"model": "llama3.2", "prompt": "x"})
        assert status == 200
    revived = await FakeOllama(models=["llama3.2:latest", "all-minilm:latest"]).start(port)
    try:
        await until(lambda: cluster.servers["gpu2"].up, within=5)
        status, _ = await post(http, gw, "/api/embed", {"model": "all-minilm", "input": "x"})
        assert status == 200 and len(revived.requests_to("/api/embed")) == 1
    finally:
        await revived.close()


async def test_readyz_is_503_when_every_server_is_down(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    await a.close()
    await b.close()
    cluster = gw.app[CLUSTER]
    await until(lambda: not any(s.up for s in cluster.servers.values()), within=5)
    async with http.get(gw.url + "/readyz") as response:
        assert response.status == 503
        body = await response.json()
        assert set(body["upstreams"]) == {"gpu1", "gpu2"} and "error" in body


async def test_one_server_behaves_as_before(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    a, _ = pair
    doc = config(a, a)
    doc["upstreams"] = [{"name": "only", "url": a.url}]
    gw = await start(gateway_factory, doc)
    status, _ = await post(http, gw, "/api/pull", {"model": "m", "stream": False}, user="root")
    assert status == 200, "one server: no name needed"
    calls = len(a.requests_to("/api/tags"))
    status, _ = await get(http, gw, "/api/tags")
    assert status == 200 and len(a.requests_to("/api/tags")) == calls + 1, "passed through"


async def test_config_refuses_both_forms_and_bad_names() -> None:
    from gateway.config_load import ConfigError, parse_config

    with pytest.raises(ConfigError) as refused:
        parse_config(
            "upstream: {url: 'http://a:1'}\n"
            "upstreams: [{name: GPU, url: 'http://b:1'}, {name: x, url: 'http://c:1'},"
            " {name: x, url: 'http://d:1'}, {name: nourl}]\n"
        )
    text = str(refused.value)
    assert "upstreams: set either `upstream` or `upstreams`, not both" in text
    assert "upstreams[0].name" in text and "upstreams[2].name: 'x' is used twice" in text
    assert "upstreams[3].url: is required" in text


async def test_reload_adds_a_server(
    gateway_factory: GatewayFactory,
    pair: tuple[FakeOllama, FakeOllama],
    http: aiohttp.ClientSession,
) -> None:
    import yaml

    from gateway.server import reload_config

    a, b = pair
    doc = config(a, b)
    doc["upstreams"] = doc["upstreams"][:1]
    gw = await start(gateway_factory, doc)
    status, _ = await post(http, gw, "/api/embed", {"model": "all-minilm", "input": "x"})
    assert status == 404  # gpu1 alone has no all-minilm (Ollama's own 404)
    text = yaml.safe_dump({"listen": "127.0.0.1:0", **config(a, b)})
    await asyncio.to_thread(gw.config_path.write_text, text)
    assert await reload_config(gw.app, gw.config_path)
    cluster = gw.app[CLUSTER]
    await until(lambda: cluster.servers["gpu2"].catalogue_at is not None)
    status, _ = await post(http, gw, "/api/embed", {"model": "all-minilm", "input": "x"})
    assert status == 200


async def test_the_upstream_override_is_refused_with_several_servers(
    tmp_path: Path, pair: Pair
) -> None:
    a, b = pair
    path = tmp_path / "gateway.yaml"
    await asyncio.to_thread(path.write_text, yaml.safe_dump(config(a, b)))
    code, _out, err = await run_cli("serve", "--config", str(path), "--upstream", a.url)
    assert code == 2 and "--upstream: cannot be used when the config lists `upstreams`" in err


async def test_made_up_model_names_do_not_flood_the_servers_with_listings(
    gateway_factory: GatewayFactory, pair: Pair, http: aiohttp.ClientSession
) -> None:
    a, b = pair
    gw = await gateway_factory(config(a, b), upstream_timings=Timings(ps_every=300.0))
    cluster = gw.app[CLUSTER]
    await until(lambda: all(s.catalogue_at for s in cluster.servers.values()))
    await asyncio.sleep(1.1)  # the catalogue is now older than refresh_at_most_every (1 s)
    before = len(a.requests_to("/api/tags"))
    statuses = await asyncio.gather(
        *(
            post(http, gw, "/api/generate", {"model": f"made-up-{i}", "prompt": "x"})
            for i in range(20)
        )
    )
    assert all(status == 404 for status, _ in statuses)
    assert len(a.requests_to("/api/tags")) - before == 1, "one shared refresh, not twenty"
    for i in range(5):  # right after it: no refresh at all
        status, _ = await post(http, gw, "/api/generate", {"model": f"other-{i}", "prompt": "x"})
        assert status == 404
    assert len(a.requests_to("/api/tags")) - before == 1


async def test_server_names_are_not_told_to_anonymous_callers(
    gateway_factory: GatewayFactory, pair: Pair, http: aiohttp.ClientSession
) -> None:
    a, b = pair
    gw = await start(gateway_factory, config(a, b))
    async with http.get(gw.url + "/upstreams/nope/api/version") as response:
        assert response.status == 404
        assert "gpu1" not in (await response.json())["error"]
