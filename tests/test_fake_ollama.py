"""Checks the fake Ollama itself against the wire formats in /work/shared/ollama-api.md.

The gateway's tests trust this fake, so it is exercised here with raw aiohttp (exact bytes)
and with the real client libraries (ollama-python, openai) that users put in front of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import openai
import pytest
import yarl

from tests.conftest import REPO
from tests.fake_ollama import FakeOllama, fake_ollama

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z"
ERROR_LINE = b'{"error":"an error was encountered while running the model"}\n'
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
GEN = {"model": "llama3.2", "prompt": "hi"}


@pytest.fixture
async def server() -> AsyncIterator[FakeOllama]:
    async with fake_ollama() as fake:
        yield fake


@pytest.fixture
async def oclient(server: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=server.url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def oai(server: FakeOllama) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="ollama", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def post(
    http: aiohttp.ClientSession, url: str | yarl.URL, body: Any, **kw: Any
) -> tuple[int, str, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    payload: Any = io.BytesIO(data) if len(data) > 1 << 20 else data  # aiohttp warns on big bytes
    async with http.post(url, data=payload, **kw) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


# ---------------------------------------------------------------------- simple routes


async def test_root_version_and_http_errors(server: FakeOllama, http: aiohttp.ClientSession):
    async with http.get(server.url + "/") as r:
        assert (r.status, r.headers["Content-Type"]) == (200, "text/plain; charset=utf-8")
        assert await r.read() == b"Ollama is running"
    async with http.head(server.url + "/") as r:
        assert r.status == 200 and r.headers["Content-Length"] == "17"
    async with http.get(server.url + "/api/version") as r:
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await r.read() == b'{"version":"0.33.0"}'
    async with http.get(server.url + "/api/nope") as r:
        assert (r.status, r.headers["Content-Type"]) == (404, "text/plain")
        assert await r.read() == b"404 page not found"
    async with http.head(server.url + "/api/ps") as r:  # GET-only route
        assert (r.status, r.headers["Content-Type"]) == (405, "text/plain")
    async with http.get(server.url + "/api/chat") as r:
        assert await r.read() == b"405 method not allowed"


async def test_tags_ps_show_follow_the_model_list(oclient: ollama.AsyncClient):
    names = [m.model for m in (await oclient.list()).models]
    assert names == ["llama3.2:latest", "qwen2.5:7b", "all-minilm:latest", "gpt-oss:120b-cloud"]
    assert "gpt-oss:120b-cloud" not in [m.model for m in (await oclient.ps()).models]
    shown = await oclient.show("LLAMA3.2")  # case-insensitive, default tag
    assert shown.details is not None and shown.details.family == "llama"
    with pytest.raises(ollama.ResponseError) as e:
        await oclient.show("nope")
    assert (e.value.status_code, e.value.error) == (404, "model 'nope' not found")


# ------------------------------------------------------------------ native generation


async def test_generate_stream_exact_records(server: FakeOllama, http: aiohttp.ClientSession):
    async with http.post(server.url + "/api/generate", json=GEN) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/x-ndjson"
        assert r.headers["Transfer-Encoding"] == "chunked"
        http_chunks = []
        buf = b""
        async for data, end_of_chunk in r.content.iter_chunks():
            buf += data
            if end_of_chunk:
                http_chunks.append(buf)
                buf = b""
    assert len(http_chunks) == 6  # each record written and flushed on its own
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in http_chunks)
    first = http_chunks[0].decode()
    assert re.fullmatch(
        r'\{"model":"llama3\.2","created_at":"' + TS + r'","response":"tok0 ","done":false\}\n',
        first,
    )
    final = json.loads(http_chunks[-1])
    assert list(final) == [
        "model",
        "created_at",
        "response",
        "done",
        "done_reason",
        "context",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ]
    assert (final["done"], final["done_reason"], final["response"]) == (True, "stop", "")
    assert (final["prompt_eval_count"], final["eval_count"]) == (26, 10)


async def test_chat_stream_false_and_zero_metrics_absent(
    server: FakeOllama, http: aiohttp.ClientSession
):
    server.usage = (0, 7)
    status, ctype, body = await post(http, server.url + "/api/chat", {**CHAT, "stream": False})
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert not body.endswith(b"\n")
    rec = json.loads(body)
    assert rec["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "}
    assert list(rec)[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert "context" not in rec and "prompt_eval_count" not in rec  # omitempty
    assert rec["eval_count"] == 7


async def test_load_records_for_empty_prompt_and_messages(
    server: FakeOllama, http: aiohttp.ClientSession
):
    _, ctype, body = await post(http, server.url + "/api/generate", {"model": "llama3.2"})
    assert ctype == "application/json; charset=utf-8"
    assert re.fullmatch(
        r'\{"model":"llama3\.2","created_at":"' + TS + r'","response":"","done":true,'
        r'"done_reason":"load"\}',
        body.decode(),
    )
    chat = {"model": "llama3.2", "messages": [], "keep_alive": 0}
    _, _, body = await post(http, server.url + "/api/chat", chat)
    assert json.loads(body)["done_reason"] == "unload"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "missing request body"),
        (b"{bad", 400, "invalid character 'b' looking for beginning of value"),
        (b'{"model":', 400, "unexpected EOF"),
        (
            b'{"model":1}',
            400,
            "json: cannot unmarshal number into Go struct field GenerateRequest.model"
            " of type string",
        ),
        (b'{"model":"x","prompt":"hi"}', 404, "model 'x' not found"),
    ],
)
async def test_generate_pre_stream_errors(
    server: FakeOllama, http: aiohttp.ClientSession, body: bytes, status: int, message: str
):
    got = await post(http, server.url + "/api/generate", body)
    expected = json.dumps({"error": message}, separators=(",", ":")).encode()
    assert got == (status, "application/json; charset=utf-8", expected)


async def test_ollama_client_generate_and_chat(oclient: ollama.AsyncClient):
    parts = [p async for p in await oclient.generate("llama3.2", "hi", stream=True)]
    assert "".join(p.response for p in parts) == "tok0 tok1 tok2 tok3 tok4 "
    assert parts[-1].done and parts[-1].eval_count == 10 and parts[-1].done_reason == "stop"
    chat = await oclient.chat("llama3.2", messages=CHAT["messages"])
    assert chat.message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert chat.prompt_eval_count == 26
    streamed = [c async for c in await oclient.chat("llama3.2", CHAT["messages"], stream=True)]
    assert [c.done for c in streamed] == [False] * 5 + [True]


async def test_num_predict_cuts_with_length(server: FakeOllama, oclient: ollama.AsyncClient):
    r = await oclient.generate("llama3.2", "hi", options={"num_predict": 2})
    assert (r.response, r.done_reason) == ("tok0 tok1 ", "length")


# --------------------------------------------------------------------- injected faults


async def test_mid_stream_error_line_and_no_done(server: FakeOllama, http: aiohttp.ClientSession):
    server.fail_mid_stream_after = 2
    status, _, body = await post(http, server.url + "/api/chat", CHAT)
    lines = body.split(b"\n")
    assert status == 200 and len(lines) == 4 and lines[-1] == b""
    assert b'"content":"tok1 "' in lines[1]
    assert lines[2] + b"\n" == ERROR_LINE
    assert b'"done":true' not in body


async def test_failure_before_first_byte_is_a_500(server: FakeOllama, http: aiohttp.ClientSession):
    server.fail_mid_stream_after = 0
    got = await post(http, server.url + "/api/generate", GEN)
    assert got == (500, "application/json", ERROR_LINE.rstrip(b"\n"))


async def test_ollama_client_raises_on_mid_stream_error(
    server: FakeOllama, oclient: ollama.AsyncClient
):
    server.fail_mid_stream_after = 1
    with pytest.raises(ollama.ResponseError) as e:
        async for _ in await oclient.chat("llama3.2", CHAT["messages"], stream=True):
            pass
    assert e.value.error == "an error was encountered while running the model"


async def test_abort_mid_stream_has_no_terminating_chunk(
    server: FakeOllama, http: aiohttp.ClientSession
):
    server.abort_mid_stream_after = 2
    got = b""
    async with http.post(server.url + "/api/generate", json=GEN) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for data in r.content.iter_any():
                got += data
    assert got.count(b"\n") == 2 and b"tok1" in got
    assert not any(rec.client_gone for rec in server.requests)


async def test_abort_before_first_byte_drops_the_connection(
    server: FakeOllama, http: aiohttp.ClientSession
):
    server.abort_mid_stream_after = 0
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(http, server.url + "/api/chat", {**CHAT, "stream": False})
    assert server.requests[-1].status is None


async def test_hang_then_client_gone(server: FakeOllama, http: aiohttp.ClientSession):
    server.hang_after_chunks = 1
    timeout = aiohttp.ClientTimeout(sock_read=0.3)
    got = b""
    async with http.post(server.url + "/api/chat", json=CHAT, timeout=timeout) as r:
        with pytest.raises(asyncio.TimeoutError):
            async for data in r.content.iter_any():
                got += data
    assert got.count(b"\n") == 1  # one chunk, then silence
    gone = await server.wait_client_gone()
    assert gone.path == "/api/chat" and gone.client_gone and gone.status == 200


async def test_resume_lets_a_held_stream_finish(server: FakeOllama, http: aiohttp.ClientSession):
    server.hang_after_chunks = 1
    async with http.post(server.url + "/api/generate", json=GEN) as r:
        first = json.loads(await r.content.readline())
        assert first["done"] is False
        server.resume()
        rest = [json.loads(line) for line in (await r.read()).splitlines()]
    assert [first, *rest][-1]["done"] is True and len(rest) == server.chunks
    assert server.hang_after_chunks is None  # later streams are not held


async def test_client_gone_while_streaming(server: FakeOllama, http: aiohttp.ClientSession):
    server.chunk_delay = 0.05
    server.chunks = 1000
    async with http.post(server.url + "/api/generate", json=GEN) as r:
        await r.content.readline()
        r.close()  # drop the connection mid-stream
    gone = await server.wait_client_gone()
    assert gone.path == "/api/generate" and gone.json == GEN


async def test_client_gone_while_thinking_non_streaming(
    server: FakeOllama, http: aiohttp.ClientSession
):
    server.first_byte_delay = 30
    with pytest.raises(asyncio.TimeoutError):
        await post(
            http,
            server.url + "/api/chat",
            {**CHAT, "stream": False},
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    gone = await server.wait_client_gone()
    assert gone.path == "/api/chat" and gone.status is None


async def test_first_byte_and_chunk_delays(server: FakeOllama, http: aiohttp.ClientSession):
    server.first_byte_delay = 0.2
    server.chunk_delay = 0.05
    t0 = time.monotonic()
    async with http.post(server.url + "/api/generate", json=GEN) as r:
        headers_at = time.monotonic() - t0
        await r.read()
    assert headers_at >= 0.2  # nothing, not even the status line, before the "model load"
    assert time.monotonic() - t0 >= 0.2 + 5 * 0.05


async def test_wait_client_gone_times_out_without_a_disconnect(server: FakeOllama):
    with pytest.raises(TimeoutError):
        await server.wait_client_gone(timeout=0.05)


async def test_status_override(server: FakeOllama, http: aiohttp.ClientSession):
    server.status_override["/api/chat"] = (503, {"error": "server busy"})
    got = await post(http, server.url + "/api/chat", CHAT)
    assert got == (503, "application/json; charset=utf-8", b'{"error":"server busy"}')


# --------------------------------------------------------------- Host check and CORS


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:11434", True),
        ("127.0.0.1:11434", True),
        ("[::1]:11434", True),
        ("10.1.2.3", True),
        ("box.internal", True),
        ("foo.local:80", True),
        ("gateway.example.com", False),
        ("8.8.8.8:11434", False),
        ("localhost.", False),
    ],
)
async def test_host_check(
    server: FakeOllama, http: aiohttp.ClientSession, host: str, allowed: bool
):
    async with http.get(server.url + "/api/version", headers={"Host": host}) as r:
        body = await r.read()
        if allowed:
            assert r.status == 200
        else:
            assert (r.status, body, r.headers["Content-Length"]) == (403, b"", "0")
            assert "Content-Type" not in r.headers


async def test_host_check_disabled(http: aiohttp.ClientSession):
    async with (
        fake_ollama(host_check=False) as fake,
        http.get(fake.url + "/", headers={"Host": "gateway.example.com"}) as r,
    ):
        assert r.status == 200


async def test_origin_check_and_preflight(server: FakeOllama, http: aiohttp.ClientSession):
    url = server.url + "/api/tags"
    async with http.get(url, headers={"Origin": "https://gw.example.com"}) as r:
        assert (r.status, await r.read()) == (403, b"")
    async with http.get(url, headers={"Origin": "http://localhost:3000"}) as r:
        assert r.status == 200
        assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    preflight = {"Origin": "app://obsidian.md", "Access-Control-Request-Method": "POST"}
    async with http.options(url, headers=preflight) as r:
        assert r.status == 204 and r.headers["Access-Control-Max-Age"] == "43200"
    async with http.options(url, headers={"Host": "localhost"}) as r:  # named host: 204
        assert r.status == 204
    async with http.options(url) as r:  # IP-literal host falls through to the router
        assert r.status == 405


# ---------------------------------------------------------------------------- records


async def test_recorded_requests(server: FakeOllama, http: aiohttp.ClientSession):
    big = b'{"model":"llama3.2","prompt":"' + b"x" * (2 << 20) + b'","stream":false}'
    url = yarl.URL(server.url + "/api/generate?a=1&b=%2F", encoded=True)  # sent verbatim
    await post(http, url, big, headers={"X-Test": "yes"})
    rec = server.requests_to("/api/generate")[-1]
    assert (rec.method, rec.query, rec.headers["X-Test"]) == ("POST", "a=1&b=%2F", "yes")
    assert rec.body_size == len(big) and rec.body_sha256 == hashlib.sha256(big).hexdigest()
    assert rec.body is None and rec.json is not None and rec.json["stream"] is False
    assert rec.status == 200 and not rec.client_gone


# ------------------------------------------------------------------- model management


async def test_pull_stream_and_model_list(server: FakeOllama, oclient: ollama.AsyncClient):
    progress = [p async for p in await oclient.pull("mistral", stream=True)]
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    layer = progress[1]
    assert layer.digest and layer.status == f"pulling {layer.digest[7:19]}"
    assert layer.completed is None  # omitempty until non-zero
    assert "mistral:latest" in server.models
    done = await oclient.pull("mistral")
    assert done.status == "success"


async def test_pull_stream_false_bytes_and_missing_model(
    server: FakeOllama, http: aiohttp.ClientSession
):
    got = await post(http, server.url + "/api/pull", {"model": "tiny", "stream": False})
    assert got == (200, "application/json", b'{"status":"success"}')
    status, _, body = await post(http, server.url + "/api/pull", {"name": "nonexistent"})
    assert status == 200
    assert body.splitlines()[-1] == b'{"error":"pull model manifest: file does not exist"}'


async def test_create_copy_delete(server: FakeOllama, oclient: ollama.AsyncClient):
    r = await oclient.create("mine", from_="llama3.2", stream=False)
    assert r.status == "success" and "mine:latest" in server.models
    await oclient.copy("mine", "mine2:v1")
    await oclient.delete("mine")
    assert "mine:latest" not in server.models and "mine2:v1" in server.models
    with pytest.raises(ollama.ResponseError) as e:
        await oclient.delete("mine")
    assert e.value.status_code == 404


async def test_create_needs_from_or_files(server: FakeOllama, http: aiohttp.ClientSession):
    got = await post(http, server.url + "/api/create", {"model": "m", "modelfile": "FROM x"})
    assert got == (
        400,
        "application/json",
        b"{\"error\":\"neither 'from' or 'files' was specified\"}",
    )


async def test_blobs_head_post_mismatch(server: FakeOllama, http: aiohttp.ClientSession):
    data = b"GGUF fake weights"
    hexd = hashlib.sha256(data).hexdigest()
    url = f"{server.url}/api/blobs/sha256:{hexd}"
    async with http.head(url) as r:
        assert r.status == 404
    wrong = "sha256:" + "0" * 64
    status, _, body = await post(http, f"{server.url}/api/blobs/{wrong}", data)
    assert status == 400
    assert json.loads(body) == {
        "error": f'digest mismatch, expected "{wrong}", got "sha256:{hexd}"'
    }
    assert (await post(http, url, data))[0] == 201
    async with http.head(url) as r:
        assert r.status == 200
    assert (await post(http, url, data))[0] == 200  # exists: answered without reading
    assert server.requests[-1].body_read is False
    assert server.blobs == {f"sha256:{hexd}": len(data)}
    got = await post(http, f"{server.url}/api/blobs/sha256:abc", data)
    assert got[:2] == (400, "application/json; charset=utf-8")
    assert got[2] == b'{"error":"invalid digest format"}'


async def test_ollama_client_create_blob(
    server: FakeOllama, oclient: ollama.AsyncClient, tmp_path: Path
):
    f = tmp_path / "w.gguf"
    f.write_bytes(b"\x00" * 300_000)
    digest = await oclient.create_blob(f)
    assert server.blobs[digest] == 300_000
    assert server.requests[-1].headers.get("Transfer-Encoding") == "chunked"


@pytest.mark.slow
async def test_blob_upload_1gib_streams_without_buffering(
    server: FakeOllama, http: aiohttp.ClientSession
):
    block = bytes(range(256)) * 4096  # 1 MiB
    n = 1024
    h = hashlib.sha256()
    for _ in range(n):
        h.update(block)
    digest = "sha256:" + h.hexdigest()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(n):
            yield block

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with http.post(f"{server.url}/api/blobs/{digest}", data=gen()) as r:
        assert r.status == 201
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024 or sys.platform == "darwin"  # far below the 1 GiB body
    assert server.blobs[digest] == n * len(block) and server.requests[-1].body is None


# ---------------------------------------------------------- OpenAI-compatible routes


async def test_openai_chat_stream_exact_bytes_with_usage(
    server: FakeOllama, http: aiohttp.ClientSession
):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, ctype, raw = await post(http, server.url + "/v1/chat/completions", body)
    assert (status, ctype) == (200, "text/event-stream")
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith(b"data: {") for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    cid = chunks[0]["id"]
    assert re.fullmatch(
        r'data: \{"id":"chatcmpl-\d+","object":"chat\.completion\.chunk","created":\d+,'
        r'"model":"llama3\.2","system_fingerprint":"fp_ollama","choices":\[\{"index":0,'
        r'"delta":\{"role":"assistant","content":"tok0 "\},"finish_reason":null\}\]\}',
        events[0].decode(),
    )
    assert chunks[1]["choices"][0]["delta"] == {"content": "tok1 "}
    assert chunks[5]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    usage = {"prompt_tokens": 26, "completion_tokens": 10, "total_tokens": 36}
    assert (chunks[6]["choices"], chunks[6]["usage"], chunks[6]["id"]) == ([], usage, cid)
    assert len(chunks) == 7


async def test_openai_sdk_chat_stream_with_and_without_usage(oai: openai.AsyncOpenAI):
    messages: Any = CHAT["messages"]
    plain = [
        c
        async for c in await oai.chat.completions.create(
            model="llama3.2", messages=messages, stream=True
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in plain) == "tok0 tok1 tok2 tok3 tok4 "
    assert plain[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in plain)
    with_usage = [
        c
        async for c in await oai.chat.completions.create(
            model="llama3.2",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    last = with_usage[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (26, 10)
    full = await oai.chat.completions.create(model="llama3.2", messages=messages)
    assert full.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert full.usage is not None and full.usage.total_tokens == 36


async def test_openai_non_stream_and_errors_bytes(server: FakeOllama, http: aiohttp.ClientSession):
    status, ctype, raw = await post(http, server.url + "/v1/chat/completions", CHAT)
    assert (status, ctype) == (200, "application/json") and raw.endswith(b"}\n")
    status, ctype, raw = await post(
        http, server.url + "/v1/chat/completions", {"model": "nope", "messages": CHAT["messages"]}
    )
    assert (status, ctype) == (404, "application/json")
    assert raw == (
        b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
        b'"param":null,"code":null}}\n'
    )
    got = await post(http, server.url + "/v1/chat/completions", {"model": "llama3.2"})
    assert got[:2] == (400, "application/json; charset=utf-8")
    assert json.loads(got[2])["error"]["message"] == "[] is too short - 'messages'"


async def test_openai_chat_mid_stream_error(server: FakeOllama, http: aiohttp.ClientSession):
    server.fail_mid_stream_after = 2
    _, _, raw = await post(http, server.url + "/v1/chat/completions", {**CHAT, "stream": True})
    events = sse_events(raw)
    assert len(events) == 3 and b"[DONE]" not in raw
    err_chunk = json.loads(events[2][6:])
    assert err_chunk["model"] == ""
    assert err_chunk["choices"] == [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]


async def test_openai_completions_include_usage(server: FakeOllama, http: aiohttp.ClientSession):
    body = {
        "model": "llama3.2",
        "prompt": "hi",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    _, _, raw = await post(http, server.url + "/v1/completions", body)
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert all(c["usage"] == zero for c in chunks[:-1])
    assert list(chunks[0]) == [
        "id",
        "object",
        "created",
        "choices",
        "model",
        "system_fingerprint",
        "usage",
    ]
    assert chunks[-2]["choices"] == [{"text": "", "index": 0, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 36


async def test_openai_models_and_embeddings(
    server: FakeOllama, oai: openai.AsyncOpenAI, http: aiohttp.ClientSession
):
    ids = [m.id async for m in oai.models.list()]
    assert ids[0] == "llama3.2:latest" and len(ids) == 4
    assert (await oai.models.retrieve("qwen2.5:7b")).owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        await oai.models.retrieve("nope")
    emb = await oai.embeddings.create(model="all-minilm", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1] and len(emb.data[0].embedding) == 8
    async with fake_ollama(models=[]) as empty, http.get(empty.url + "/v1/models") as r:
        assert await r.read() == b'{"object":"list","data":null}\n'


async def test_native_embeddings(server: FakeOllama, oclient: ollama.AsyncClient):
    r = await oclient.embed("all-minilm", ["x", "y"])
    assert len(r.embeddings) == 2 and r.prompt_eval_count == 26
    legacy = await oclient.embeddings("all-minilm", "x")
    assert list(legacy.embedding) == list(r.embeddings[0])


async def test_responses_stream_and_non_stream(server: FakeOllama, oai: openai.AsyncOpenAI):
    names = []
    final: Any = None
    async for ev in await oai.responses.create(model="llama3.2", input="hi", stream=True):
        names.append(ev.type)
        final = ev
    assert names[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert names.count("response.output_text.delta") == 5 and names[-1] == "response.completed"
    assert final.response.usage.input_tokens == 26 and final.response.usage.total_tokens == 36
    assert final.response.output_text == "tok0 tok1 tok2 tok3 tok4 "
    resp = await oai.responses.create(model="llama3.2", input="hi")
    assert resp.usage is not None and resp.usage.output_tokens == 10


async def test_responses_sse_framing(server: FakeOllama, http: aiohttp.ClientSession):
    async with http.post(
        server.url + "/v1/responses", json={"model": "llama3.2", "input": "x", "stream": True}
    ) as r:
        assert r.headers["Cache-Control"] == "no-cache"
        raw = await r.read()
    first = sse_events(raw)[0]
    assert first.startswith(b'event: response.created\ndata: {"response":{"background":false,')
    assert b"[DONE]" not in raw


async def test_anthropic_messages(server: FakeOllama, http: aiohttp.ClientSession):
    body = {"model": "llama3.2", "max_tokens": 64, "messages": CHAT["messages"], "stream": True}
    _, ctype, raw = await post(http, server.url + "/v1/messages", body)
    assert ctype == "text/event-stream"
    events = [e.split(b"\n", 1) for e in sse_events(raw)]
    names = [e[0].removeprefix(b"event: ").decode() for e in events]
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * 5 + [
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[-2][1] == (
        b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"input_tokens":26,"output_tokens":10}}'
    )
    status, _, raw = await post(http, server.url + "/v1/messages", {**body, "max_tokens": 0})
    err = json.loads(raw)
    assert status == 400 and err["type"] == "error"
    assert err["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens is required and must be positive",
    }


async def test_audio_transcription(server: FakeOllama, http: aiohttp.ClientSession):
    form = aiohttp.FormData()
    form.add_field("model", "llama3.2")
    form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
    async with http.post(server.url + "/v1/audio/transcriptions", data=form) as r:
        assert r.status == 200
        assert await r.read() == b'{"text":"tok0 tok1 tok2 tok3 tok4"}\n'
    form = aiohttp.FormData()
    form.add_field("model", "llama3.2")
    async with http.post(server.url + "/v1/audio/transcriptions", data=form) as r:
        assert r.status == 400


# ------------------------------------------------------------------ load and standalone


async def test_many_concurrent_streams(server: FakeOllama, http: aiohttp.ClientSession):
    async def one() -> bytes:
        return (await post(http, server.url + "/api/chat", CHAT))[2]

    bodies = await asyncio.gather(*(one() for _ in range(200)))
    assert all(b.count(b"\n") == 6 and b'"done":true' in b for b in bodies)


async def test_standalone_main_prints_url(http: aiohttp.ClientSession):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fake_ollama",
        "--port",
        "0",
        "--chunks",
        "2",
        "--parallel",
        "1",
        "--model-parallel",
        "all-minilm=1",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        m = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert m, line
        _, _, body = await post(http, m.group(1) + "/api/generate", GEN)
        assert body.count(b"\n") == 3
    finally:
        proc.terminate()
        await proc.wait()


# ------------------------------------------------------------- Ollama-like slots (issue 11)

LLAMA = "llama3.2:latest"


def gen(prompt: str, **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "llama3.2", "prompt": prompt}
    if options:
        body["options"] = options
    return body


@pytest.fixture
async def slotted() -> AsyncIterator[FakeOllama]:
    async with fake_ollama(parallel=1, model_parallel={"all-minilm": 2}) as fake:
        yield fake


async def hold_first(fake: FakeOllama, http: aiohttp.ClientSession) -> asyncio.Task[Any]:
    """One generation that holds llama3.2's only slot until `fake.resume()`."""
    fake.hang_after_chunks = 1
    task = asyncio.create_task(post(http, fake.url + "/api/generate", gen("holder")))
    await fake.wait_for(lambda: fake.running(LLAMA) == 1)
    return task


async def test_slots_off_by_default_nothing_waits_or_is_recorded(
    server: FakeOllama, http: aiohttp.ClientSession
):
    server.hang_after_chunks = 1
    tasks = [asyncio.create_task(post(http, server.url + "/api/chat", CHAT)) for _ in range(3)]
    await asyncio.sleep(0.1)
    assert server.running(LLAMA) == 0 and server.grants == [] and server.max_running == {}
    server.resume()
    assert [s for s, _, _ in await asyncio.gather(*tasks)] == [200, 200, 200]


async def test_slots_fifo_order_and_grant_records(slotted: FakeOllama, http: aiohttp.ClientSession):
    holder = await hold_first(slotted, http)
    waiters = []
    for i in range(5):  # each one queued before the next is sent: a known arrival order
        waiters.append(asyncio.create_task(post(http, slotted.url + "/api/generate", gen(f"w{i}"))))
        await slotted.wait_for(lambda i=i: slotted.waiting("llama3.2") == i + 1)
    assert [r.json["prompt"] for r in slotted.slots.waiting_requests("llama3.2")] == [
        f"w{i}" for i in range(5)
    ]
    await asyncio.sleep(0.05)  # a measurable wait for the first waiter
    slotted.resume()
    assert all(s == 200 for s, _, _ in await asyncio.gather(holder, *waiters))

    grants = slotted.grants
    assert [g.request.json["prompt"] for g in grants] == ["holder"] + [f"w{i}" for i in range(5)]
    assert [g.seq for g in grants] == sorted(g.seq for g in grants)
    for g in grants:
        assert (g.path, g.model, g.running) == ("/api/generate", LLAMA, 1)
        assert g.request in slotted.requests and g.request.status == 200
        assert g.finished_at is not None and g.duration is not None and g.duration >= 0
        assert g.wait == pytest.approx(g.granted_at - g.queued_at)
    assert grants[0].wait < 0.05 <= grants[1].wait
    for prev, nxt in zip(grants, grants[1:], strict=False):  # one at a time, back to back
        assert prev.finished_at is not None and prev.finished_at <= nxt.granted_at
    assert slotted.max_running == {LLAMA: 1}
    assert slotted.running(LLAMA) == 0 and slotted.waiting(LLAMA) == 0


async def test_slots_queue_depth_is_unlimited(slotted: FakeOllama):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        holder = await hold_first(slotted, http)
        tasks = [
            asyncio.create_task(post(http, slotted.url + "/api/chat", CHAT)) for _ in range(150)
        ]
        await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 150, timeout=20)
        slotted.resume()
        results = await asyncio.gather(holder, *tasks)
    assert [s for s, _, _ in results] == [200] * 151
    assert len(slotted.grants) == 151 and slotted.max_running == {LLAMA: 1}
    assert max(g.wait for g in slotted.grants) > 0


async def test_slots_waiter_whose_client_leaves_never_runs(
    slotted: FakeOllama, http: aiohttp.ClientSession
):
    holder = await hold_first(slotted, http)
    first = asyncio.create_task(post(http, slotted.url + "/api/generate", gen("leaves")))
    await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 1)
    second = asyncio.create_task(post(http, slotted.url + "/api/generate", gen("stays")))
    await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 2)
    first.cancel()  # the client closes its connection while queued
    gone = await slotted.wait_client_gone()
    assert gone.json["prompt"] == "leaves"
    await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 1)
    assert [r.json["prompt"] for r in slotted.slots.waiting_requests(LLAMA)] == ["stays"]
    slotted.resume()
    assert (await holder)[0] == 200 and (await second)[0] == 200
    assert [g.request.json["prompt"] for g in slotted.grants] == ["holder", "stays"]
    assert gone.status is None


async def test_slots_held_until_client_leaves_mid_stream(
    slotted: FakeOllama, http: aiohttp.ClientSession
):
    holder = await hold_first(slotted, http)
    nxt = asyncio.create_task(post(http, slotted.url + "/api/generate", gen("next")))
    await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 1)
    holder.cancel()  # the running stream's client goes: its slot passes to the waiter
    await slotted.wait_client_gone()
    slotted.resume()
    assert (await nxt)[0] == 200
    first, second = slotted.grants
    assert first.finished_at is not None and first.finished_at <= second.granted_at


async def test_slots_released_on_abort_and_failure(
    slotted: FakeOllama, http: aiohttp.ClientSession
):
    slotted.abort_mid_stream_after = 1
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(http, slotted.url + "/api/generate", gen("crash"))
    slotted.abort_mid_stream_after = None
    slotted.fail_mid_stream_after = 0
    assert (await post(http, slotted.url + "/api/generate", gen("fails")))[0] == 500
    slotted.fail_mid_stream_after = None
    assert (await post(http, slotted.url + "/api/generate", gen("ok")))[0] == 200
    assert slotted.running(LLAMA) == 0
    assert all(g.finished_at is not None for g in slotted.grants) and len(slotted.grants) == 3


async def test_slots_max_running_never_above_parallel(http: aiohttp.ClientSession):
    async with fake_ollama(parallel=3, chunk_delay=0.005) as fake:
        routes = [
            ("/api/chat", CHAT),
            ("/api/generate", GEN),
            ("/v1/chat/completions", {**CHAT, "stream": True}),
            ("/v1/completions", {"model": "llama3.2", "prompt": "hi"}),
            ("/v1/responses", {"model": "llama3.2", "input": "hi"}),
            ("/v1/messages", {**CHAT, "max_tokens": 5}),
        ]
        tasks = [post(http, fake.url + path, body) for path, body in routes * 4]
        results = await asyncio.gather(*tasks)
    assert [s for s, _, _ in results] == [200] * 24
    assert fake.max_running == {LLAMA: 3}
    assert len(fake.grants) == 24 and all(1 <= g.running <= 3 for g in fake.grants)
    assert {g.path for g in fake.grants} == {p for p, _ in routes}


async def test_slots_per_model_and_normalised_names(
    slotted: FakeOllama, http: aiohttp.ClientSession
):
    holder = await hold_first(slotted, http)  # llama3.2 (parallel 1) is busy...
    emb = [  # ...but all-minilm has its own slots (model_parallel 2), named three ways
        post(http, slotted.url + "/api/embed", {"model": "all-minilm", "input": "a"}),
        post(http, slotted.url + "/api/embeddings", {"model": "ALL-MINILM:latest", "prompt": "b"}),
        post(http, slotted.url + "/v1/embeddings", {"model": "all-minilm:latest", "input": "c"}),
    ]
    assert [s for s, _, _ in await asyncio.gather(*emb)] == [200, 200, 200]
    assert slotted.slots.limit("all-minilm:latest") == 2 and slotted.slots.limit("qwen2.5:7b") == 1
    assert 1 <= slotted.max_running["all-minilm:latest"] <= 2
    assert slotted.waiting("llama3.2:latest") == 0
    slotted.resume()
    assert (await holder)[0] == 200


async def test_slots_non_inference_routes_never_wait(
    slotted: FakeOllama, http: aiohttp.ClientSession
):
    holder = await hold_first(slotted, http)
    queued = asyncio.create_task(post(http, slotted.url + "/api/chat", CHAT))
    await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 1)
    for method, path, body in [
        ("GET", "/", None),
        ("GET", "/api/version", None),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("POST", "/api/show", {"model": "llama3.2"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/llama3.2", None),
        ("POST", "/api/generate", {"model": "llama3.2"}),  # a load record: no slot
        ("POST", "/api/chat", {"model": "llama3.2", "messages": []}),
        ("POST", "/v1/completions", {"model": "llama3.2", "prompt": ""}),
        ("POST", "/api/embed", {"model": "llama3.2", "input": []}),
        ("POST", "/api/generate", {"model": "nope", "prompt": "x"}),  # 404 before any slot
    ]:
        async with http.request(method, slotted.url + path, json=body) as r:
            await r.read()
            assert r.status in (200, 404), (path, r.status)
    assert slotted.waiting(LLAMA) == 1 and len(slotted.grants) == 1
    slotted.resume()
    assert (await holder)[0] == 200 and (await queued)[0] == 200


async def test_wait_for_times_out(slotted: FakeOllama):
    with pytest.raises(TimeoutError):
        await slotted.wait_for(lambda: slotted.waiting(LLAMA) == 1, timeout=0.05)


async def test_usage_from_plan_counts_chunks_and_prompt(http: aiohttp.ClientSession):
    async with fake_ollama(chunks=40, usage_from_plan=True) as fake:
        _, _, body = await post(http, fake.url + "/api/generate", gen("x" * 400, num_predict=7))
        final = json.loads(body.splitlines()[-1])
        assert (final["prompt_eval_count"], final["eval_count"]) == (100, 7)
        _, _, body = await post(http, fake.url + "/api/chat", {**CHAT, "stream": False})
        final = json.loads(body)
        assert (final["prompt_eval_count"], final["eval_count"]) == (1, 40)
        chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "y" * 96}]}
        _, _, body = await post(http, fake.url + "/v1/chat/completions", {**chat, "max_tokens": 3})
        assert json.loads(body)["usage"] == {
            "prompt_tokens": 25,
            "completion_tokens": 3,
            "total_tokens": 28,
        }
        msgs = {**chat, "max_tokens": 12}
        _, _, body = await post(http, fake.url + "/v1/messages", msgs)
        assert json.loads(body)["usage"] == {"input_tokens": 25, "output_tokens": 12}
        resp = {"model": "llama3.2", "input": "z" * 80, "max_output_tokens": 2}
        _, _, body = await post(http, fake.url + "/v1/responses", resp)
        usage = json.loads(body)["usage"]
        assert (usage["input_tokens"], usage["output_tokens"]) == (20, 2)
        emb = {"model": "all-minilm", "input": ["a" * 40, "b" * 40]}
        _, _, body = await post(http, fake.url + "/api/embed", emb)
        assert json.loads(body)["prompt_eval_count"] == 20
    async with fake_ollama(chunks=40) as fake:  # off: the fixed usage as before
        _, _, body = await post(http, fake.url + "/api/generate", gen("x" * 400, num_predict=7))
        final = json.loads(body.splitlines()[-1])
        assert (final["prompt_eval_count"], final["eval_count"]) == (26, 10)
