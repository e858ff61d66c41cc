"""The usage reader and the include_usage rewriter, fed Ollama's exact bytes cut anywhere."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.accounting import UsageRewriteTap, UsageTap
from gateway.context import RequestContext
from tests.fake_ollama_wire import (
    EVAL_NS,
    AnthropicFormat,
    GenFormat,
    NativeFormat,
    OpenAIChatFormat,
    OpenAICompletionFormat,
    ResponsesFormat,
    go_json,
)

USAGE = (26, 10)


def make_ctx(model: str = "llama3.2") -> RequestContext:
    ctx = RequestContext(
        request_id="t",
        state=None,
        method="POST",
        path="/",
        query="",  # type: ignore[arg-type]
        client_ip="127.0.0.1",
    )
    ctx.json = {"model": model}
    return ctx


def headers(content_type: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Content-Type": content_type}))


def stream_of(fmt: GenFormat, n: int = 3) -> bytes:
    return b"".join(fmt.chunk(i, f"tok{i} ") for i in range(n)) + fmt.final()


def run(tap: UsageTap, body: bytes, cuts: list[int], ctype: str, status: int = 200) -> bytes:
    """Feed `body` cut at `cuts`; return what the client would receive."""
    tap.begin(status, headers(ctype))
    out = []
    start = 0
    for cut in [*cuts, len(body)]:
        chunk = body[start:cut]
        start = cut
        if not chunk:
            continue
        written = tap.feed(chunk)
        if not tap.rewrites:
            assert written is chunk  # a reading tap never copies
        out.append(written)
    out.append(tap.end())
    return b"".join(out)


def every_cut(body: bytes, step: int = 7) -> list[list[int]]:
    """One cut anywhere, two cuts, and one chunk per byte (the worst case)."""
    singles = [[i] for i in range(1, len(body), step)]
    return [[], *singles, [len(body) // 3, 2 * len(body) // 3], list(range(1, len(body)))]


def test_native_stream_usage_from_the_done_record() -> None:
    body = stream_of(NativeFormat("generate", "llama3.2", USAGE, "stop"))
    for cuts in every_cut(body):
        ctx = make_ctx()
        assert run(UsageTap(ctx, "native"), body, cuts, "application/x-ndjson") == body
        assert ctx.usage is not None
        assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == USAGE
        assert ctx.usage.model == "llama3.2"
        assert ctx.usage.eval_seconds == pytest.approx(EVAL_NS / 1e9)


def test_native_chat_single_object_and_absent_counts() -> None:
    fmt = NativeFormat("chat", "qwen2.5:7b", (0, 7), "stop")
    status, ctype, body = fmt.single("hello")
    ctx = make_ctx()
    assert run(UsageTap(ctx, "native"), body, [5, 40], ctype) == body
    assert ctx.usage is not None
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens, ctx.usage.total) == (0, 7, 7)
    assert ctx.usage.model == "qwen2.5:7b"


def test_a_done_key_nested_in_a_chunk_is_not_the_final_record() -> None:
    line = (
        b'{"model":"m","message":{"tool_calls":[{"function":{"arguments":{"done":true,'
        b'"prompt_eval_count":999}}}]},"done":false}\n'
    )
    ctx = make_ctx()
    run(UsageTap(ctx, "native"), line, [], "application/x-ndjson")
    assert ctx.usage is None


def test_native_error_and_mid_stream_error_carry_no_usage() -> None:
    fmt = NativeFormat("generate", "llama3.2", USAGE, "stop")
    ctx = make_ctx()
    run(UsageTap(ctx, "native"), b'{"error":"model not found"}', [], "application/json", 404)
    assert ctx.usage is None
    body = fmt.chunk(0, "a") + fmt.mid_error()
    run(UsageTap(ctx, "native"), body, [3], "application/x-ndjson")
    assert ctx.usage is None


@pytest.mark.parametrize("kind", ["native_embed", "openai_embed"])
def test_embeddings_read_from_the_tail(kind: str) -> None:
    vectors = [[0.1234] * 2000 for _ in range(20)]  # ~200 KB of numbers, never parsed
    if kind == "native_embed":
        body = go_json(
            {
                "model": "all-minilm",
                "embeddings": vectors,
                "total_duration": 5,
                "prompt_eval_count": 42,
            }
        )
    else:
        body = (
            go_json(
                {
                    "object": "list",
                    "data": vectors,
                    "model": "all-minilm",
                    "usage": {"prompt_tokens": 42, "total_tokens": 42},
                }
            )
            + b"\n"
        )
    ctx = make_ctx("all-minilm")
    assert (
        run(UsageTap(ctx, kind), body, list(range(1000, len(body), 9000)), "application/json")
        == body
    )
    assert ctx.usage is not None
    assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == (42, 0)
    assert ctx.usage.model == "all-minilm"


def test_openai_stream_with_client_requested_usage_is_read_untouched() -> None:
    body = stream_of(OpenAIChatFormat("llama3.2", USAGE, "stop", include_usage=True))
    for cuts in every_cut(body, step=13):
        ctx = make_ctx()
        assert run(UsageTap(ctx, "openai"), body, cuts, "text/event-stream") == body
        assert ctx.usage is not None and ctx.usage.total == 36


def test_openai_completions_client_usage_zero_chunks_are_skipped() -> None:
    body = stream_of(OpenAICompletionFormat("llama3.2", USAGE, "stop", include_usage=True))
    ctx = make_ctx()
    assert run(UsageTap(ctx, "openai"), body, [], "text/event-stream") == body
    assert ctx.usage is not None and (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == USAGE


def _chat_pair() -> tuple[bytes, bytes]:
    """(what Ollama sends with include_usage, what the client would have got without)."""
    fmt = OpenAIChatFormat("llama3.2", USAGE, "stop", include_usage=True)
    chunks = b"".join(fmt.chunk(i, f"tok{i} ") for i in range(3))
    with_usage = chunks + fmt.final()
    fmt.include_usage = False
    return with_usage, chunks + fmt.final()


def _without_usage(sse: bytes) -> bytes:
    """Ollama's /v1/completions stream as it is without include_usage: Go-encode each chunk
    again without its `usage` member, and no usage-only chunk."""
    out = []
    for event in sse.split(b"\n\n")[:-1]:
        payload = event[len(b"data: ") :]
        if payload == b"[DONE]":
            out.append(event + b"\n\n")
            continue
        record: dict[str, Any] = json.loads(payload)
        if record["choices"] == []:
            continue
        record.pop("usage", None)
        out.append(b"data: " + go_json(record) + b"\n\n")
    return b"".join(out)


def test_injected_usage_chunk_is_stripped_from_chat_streams() -> None:
    upstream, expected = _chat_pair()
    assert upstream != expected
    for cuts in every_cut(upstream, step=11):
        ctx = make_ctx()
        tap = UsageRewriteTap(ctx, "openai")
        assert run(tap, upstream, cuts, "text/event-stream") == expected
        assert tap.rewrites
        assert ctx.usage is not None and ctx.usage.total == 36


def test_injected_zero_usage_is_stripped_from_every_completions_chunk() -> None:
    upstream = stream_of(OpenAICompletionFormat("llama3.2", USAGE, "length", include_usage=True))
    expected = _without_usage(upstream)
    assert b'"usage"' not in expected
    for cuts in every_cut(upstream, step=17):
        ctx = make_ctx()
        assert run(UsageRewriteTap(ctx, "openai"), upstream, cuts, "text/event-stream") == expected
        assert ctx.usage is not None and ctx.usage.total == 36


def test_whole_events_pass_as_the_same_object() -> None:
    upstream, _ = _chat_pair()
    first_event = upstream[: upstream.index(b"\n\n") + 2]
    tap = UsageRewriteTap(make_ctx(), "openai")
    tap.begin(200, headers("text/event-stream"))
    assert tap.feed(first_event) is first_event


def test_rewriter_leaves_error_answers_alone() -> None:
    body = b'{"error":{"message":"model \'x\' not found","type":"not_found_error"}}\n'
    ctx = make_ctx()
    tap = UsageRewriteTap(ctx, "openai")
    assert run(tap, body, [10], "application/json", 404) == body
    assert not tap.rewrites and ctx.usage is None


def test_responses_stream_and_json() -> None:
    fmt = ResponsesFormat("llama3.2", USAGE, "stop", request={"model": "llama3.2"})
    body = stream_of(fmt)
    for cuts in every_cut(body, step=101):
        ctx = make_ctx()
        assert run(UsageTap(ctx, "responses"), body, cuts, "text/event-stream") == body
        assert ctx.usage is not None
        assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == USAGE
    _, ctype, single = ResponsesFormat("llama3.2", USAGE, "stop", request={}).single("hi")
    ctx = make_ctx()
    run(UsageTap(ctx, "responses"), single, [20], ctype)
    assert ctx.usage is not None and ctx.usage.total == 36


def test_anthropic_stream_and_json() -> None:
    fmt = AnthropicFormat("llama3.2", USAGE, "stop", estimated_input=99)
    body = stream_of(fmt)
    for cuts in every_cut(body, step=31):
        ctx = make_ctx()
        assert run(UsageTap(ctx, "anthropic"), body, cuts, "text/event-stream") == body
        assert ctx.usage is not None
        assert (ctx.usage.prompt_tokens, ctx.usage.completion_tokens) == USAGE
    _, ctype, single = AnthropicFormat("llama3.2", USAGE, "stop", estimated_input=9).single("x")
    ctx = make_ctx()
    run(UsageTap(ctx, "anthropic"), single, [], ctype)
    assert ctx.usage is not None and ctx.usage.total == 36
