"""Allowed and refused calls through the real gateway, with the official clients.

alice: role user (all local models); bob: user limited to `qwen*`; root: admin;
carol: admin limited to `llama3.2:*`. See tests/policy_support.py.
"""

from __future__ import annotations

import aiohttp
import httpx
import ollama
import openai
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.fake_ollama import FakeOllama
from tests.policy_support import ALICE_KEY, PASSWORD, ROOT_KEY, policy_config

CLOUD = "gpt-oss:120b-cloud"


@pytest.fixture
async def locked(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    return await gateway_factory(policy_config(fake.url))


def client(gw: RunningGateway, user: str | None) -> ollama.AsyncClient:
    auth = httpx.BasicAuth(user, PASSWORD) if user else None
    return ollama.AsyncClient(host=gw.url, auth=auth)


def oai(gw: RunningGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)


async def refused(call: object, status: int) -> str:
    """Await `call`, expecting an ollama ResponseError with `status`; its message."""
    with pytest.raises(ollama.ResponseError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.status_code == status
    return str(caught.value.error)


async def test_user_inference_and_filtered_listings(
    locked: RunningGateway, fake: FakeOllama
) -> None:
    async with client(locked, "alice") as alice:
        parts = [
            p
            async for p in await alice.chat(
                "llama3.2", [{"role": "user", "content": "hi"}], stream=True
            )
        ]
        assert parts[-1].done
        generated = await alice.generate("Llama3.2:latest", "hi")  # names compare like Ollama
        assert generated.done
        assert len((await alice.embed("all-minilm", "x")).embeddings) == 1
        assert (await alice.show("qwen2.5:7b")).details is not None
        listed = [m.model for m in (await alice.list()).models]
        assert "llama3.2:latest" in listed and CLOUD not in listed
        assert CLOUD not in [m.model for m in (await alice.ps()).models]
    assert fake.requests_to("/api/chat") and fake.requests_to("/api/generate")


async def test_cloud_models_are_refused_unless_named(
    locked: RunningGateway, fake: FakeOllama
) -> None:
    async with client(locked, "alice") as alice:
        message = await refused(alice.chat(CLOUD, [{"role": "user", "content": "x"}]), 403)
        assert message == f"model not allowed: {CLOUD}"  # names the model, not the rules
        await refused(alice.generate("gpt-oss:20b:cloud", "x"), 403)
        await refused(alice.show(CLOUD), 403)
    assert fake.requests == []


async def test_per_user_allow_list_overrides_roles(
    locked: RunningGateway, fake: FakeOllama
) -> None:
    async with client(locked, "bob") as bob:
        assert [m.model for m in (await bob.list()).models] == ["qwen2.5:7b"]
        assert await bob.chat("qwen2.5:7b", [{"role": "user", "content": "x"}])
        message = await refused(bob.chat("llama3.2", [{"role": "user", "content": "x"}]), 403)
        assert message == "model not allowed: llama3.2:latest"
    assert [r.path for r in fake.requests] == ["/api/tags", "/api/chat"]


async def test_management_is_admin_only(locked: RunningGateway, fake: FakeOllama) -> None:
    async with client(locked, "alice") as alice:
        assert await refused(alice.pull("tiny"), 403) == "route not allowed: POST /api/pull"
        await refused(alice.delete("llama3.2"), 403)
        await refused(alice.copy("llama3.2", "mine"), 403)
        await refused(alice.create("mine", from_="llama3.2"), 403)
    assert fake.requests == []
    async with client(locked, "root") as root:
        assert (await root.pull("tiny")).status == "success"
        assert (await root.copy("llama3.2", "mine")).status == "success"
        assert (await root.delete("mine")).status == "success"
        await refused(root.copy("llama3.2", "evil:cloud"), 403)  # destination checked
        await refused(root.create("mine", from_=CLOUD), 403)  # `from` checked
        await refused(root.pull(CLOUD), 403)
    assert [r.path for r in fake.requests] == ["/api/pull", "/api/copy", "/api/delete"]


async def test_admin_with_restricted_models(locked: RunningGateway, fake: FakeOllama) -> None:
    async with client(locked, "carol") as carol:
        await refused(carol.copy("qwen2.5:7b", "llama3.2:copy"), 403)  # source checked
        await refused(carol.delete("qwen2.5:7b"), 403)
        assert (await carol.copy("llama3.2", "llama3.2:mine")).status == "success"
    assert [r.path for r in fake.requests] == ["/api/copy"]


async def test_anonymous_is_challenged(
    locked: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    async with client(locked, None) as anonymous:
        assert await refused(anonymous.list(), 401) == "authentication required"
        await refused(anonymous.chat("llama3.2", []), 401)
    async with http.get(locked.url + "/api/version") as response:
        assert response.status == 200  # public
    assert [r.path for r in fake.requests] == ["/api/version"]


async def test_openai_sdk_allowed_and_refused(locked: RunningGateway, fake: FakeOllama) -> None:
    async with oai(locked, ALICE_KEY) as alice:
        ids = [m.id async for m in alice.models.list()]
        assert "llama3.2:latest" in ids and CLOUD not in ids
        assert (await alice.models.retrieve("llama3.2")).id == "llama3.2"
        done = await alice.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
        assert done.choices[0].message.content
        stream = await alice.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert [chunk async for chunk in stream]
        assert (await alice.embeddings.create(model="all-minilm", input="x")).data
        heard = await alice.audio.transcriptions.create(
            model="llama3.2", file=("a.wav", b"RIFF....WAVE")
        )
        assert heard.text is not None
        seen = len(fake.requests)
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await alice.chat.completions.create(
                model=CLOUD, messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.status_code == 403
        with pytest.raises(openai.PermissionDeniedError):
            await alice.models.retrieve(CLOUD)
        with pytest.raises(openai.PermissionDeniedError):
            await alice.embeddings.create(model="gpt-oss:cloud", input="x")
        with pytest.raises(openai.PermissionDeniedError):
            await alice.audio.transcriptions.create(model=CLOUD, file=("a.wav", b"RIFF"))
        with pytest.raises(openai.PermissionDeniedError):
            await alice.completions.create(model=CLOUD, prompt="x")
        assert len(fake.requests) == seen  # none of the refused calls was forwarded
    async with oai(locked, "sk-wrong") as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
    async with oai(locked, ROOT_KEY) as root:
        assert CLOUD not in [m.id async for m in root.models.list()]  # `*` is local only
