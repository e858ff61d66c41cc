"""bench/fast_upstream.py's Ollama-like slots (`--parallel`): FIFO per model, no byte before
the grant, a queued client that leaves never runs, `GET /bench/slots`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from bench import fast_upstream


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    """A fast upstream with one slot per model, 4 records 20 ms apart; yields its port."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    settings = fast_upstream.Settings(4, 0.02, parallel=1)
    task = asyncio.create_task(fast_upstream.serve("127.0.0.1", 0, settings, ready.set_result))
    try:
        yield await asyncio.wait_for(ready, 5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def chat(model: str, tag: str, num_predict: int | None = None) -> bytes:
    body: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": tag}]}
    if num_predict is not None:
        body["options"] = {"num_predict": num_predict}
    data = json.dumps(body).encode()
    head = f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


async def slots(port: int) -> dict[str, dict[str, int]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /bench/slots HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        data: dict[str, dict[str, int]] = json.loads(await reader.readexactly(length))
        return data
    finally:
        writer.close()


async def wait_waiting(port: int, n: int) -> None:
    for _ in range(200):
        if (await slots(port)).get("llama3.2:latest", {}).get("waiting") == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {n} waiting")


async def stream(port: int, request: bytes, order: list[str], tag: str) -> int:
    """Send one chat; note `tag` in `order` when its first byte arrives; count its records."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        order.append(tag)
        assert head.startswith(b"HTTP/1.1 200 OK")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = await reader.read(65536)
            assert chunk
            data += chunk
        return data.count(b'"sent_ns"')
    finally:
        writer.close()


async def test_one_slot_fifo_and_a_leaver_never_runs(upstream: int) -> None:
    order: list[str] = []
    first = asyncio.create_task(stream(upstream, chat("llama3.2", "a"), order, "a"))
    await asyncio.sleep(0.01)
    tasks = [first]
    for i, tag in enumerate("bcd"):  # queued in this order, `llama3.2` = `llama3.2:latest`
        model = "llama3.2" if i % 2 else "LLAMA3.2:latest"
        tasks.append(asyncio.create_task(stream(upstream, chat(model, tag), order, tag)))
        await wait_waiting(upstream, i + 1)
    _, leaver = await asyncio.open_connection("127.0.0.1", upstream)
    leaver.write(chat("llama3.2", "gone"))
    await wait_waiting(upstream, 4)
    leaver.close()  # leaves the queue: never runs
    await wait_waiting(upstream, 3)
    assert order == ["a"]  # nothing, not even a status line, before the grant
    assert await asyncio.gather(*tasks) == [4, 4, 4, 4]
    assert order == ["a", "b", "c", "d"]
    state = (await slots(upstream))["llama3.2:latest"]
    # maxima since the previous read (wait_waiting's last one, after the leaver: 3 waiting)
    assert state["grants"] == 4 and state["max_running"] == 1 and state["max_waiting"] == 3
    assert (state["running"], state["waiting"]) == (0, 0)
    assert (await slots(upstream))["llama3.2:latest"]["max_waiting"] == 0


async def test_models_have_their_own_slots_and_num_predict_cuts(upstream: int) -> None:
    order: list[str] = []
    results = await asyncio.gather(
        stream(upstream, chat("llama3.2", "a", num_predict=2), order, "a"),
        stream(upstream, chat("qwen2.5:7b", "b"), order, "b"),
    )
    assert results == [2, 4]
    state = await slots(upstream)
    assert state["llama3.2:latest"]["max_waiting"] == 0 and state["qwen2.5:7b"]["grants"] == 1


async def get_json(port: int, path: str) -> object:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK"), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        return json.loads(await reader.readexactly(length))
    finally:
        writer.close()


async def test_catalogue_routes_in_ollamas_shapes(upstream: int) -> None:
    """What a gateway with several upstreams learns: installed, loaded, version."""
    tags, ps, version = [
        await get_json(upstream, p) for p in ("/api/tags", "/api/ps", "/api/version")
    ]
    assert isinstance(tags, dict) and isinstance(ps, dict) and isinstance(version, dict)
    assert "llama3.2:latest" in [m["name"] for m in tags["models"]]
    (loaded,) = ps["models"]
    assert loaded["name"] == loaded["model"] == "llama3.2:latest"
    assert {"size", "digest", "details", "expires_at", "size_vram"} <= set(loaded)
    assert version == {"version": "0.12.6"}


async def test_non_streamed_chat_is_one_json_answer_after_the_generation(upstream: int) -> None:
    data = json.dumps({"model": "llama3.2", "messages": [], "stream": False}).encode()
    request = f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream)
    try:
        started = asyncio.get_running_loop().time()
        writer.write(request.encode() + data)
        head = await reader.readuntil(b"\r\n\r\n")
        elapsed = asyncio.get_running_loop().time() - started
        assert head.startswith(b"HTTP/1.1 200 OK") and b"chunked" not in head.lower()
        assert elapsed >= 0.05  # 4 records 20 ms apart: sent when the last one would be
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        assert answer["done"] is True and answer["eval_count"] == 4
        assert answer["message"] == {"role": "assistant", "content": "tok" * 3}
        writer.write(chat("llama3.2", "again", num_predict=2))  # keep-alive: next request
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
    finally:
        writer.close()
