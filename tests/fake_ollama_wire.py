"""Byte-exact builders for Ollama's wire formats, used by ``tests/fake_ollama.py``.

Kept free of aiohttp so every format can be read (and reviewed against
/work/shared/ollama-api.md) in one place.  Field order follows the Go structs in
ollama ``api/types.go``, ``openai/openai.go`` and ``anthropic/anthropic.go``; the
Responses API events are Go ``map[string]any`` values, which encoding/json writes
with *sorted* keys, so those are emitted with ``sort_keys=True``.
"""

from __future__ import annotations

import base64
import json
import random
import re
import secrets
import struct
import time
from datetime import UTC, datetime
from typing import Any

ERROR_RUNNING = "an error was encountered while running the model"
JSON_CT = "application/json; charset=utf-8"  # gin c.JSON
JSON_CT_PLAIN = "application/json"  # json.Encoder writers, pre-stream errors, pull stream:false
NDJSON_CT = "application/x-ndjson"
SSE_CT = "text/event-stream"

# Fixed fake timings (nanoseconds) for the native done record.
LOAD_NS = 1_334_875
PROMPT_EVAL_NS = 342_546_000
EVAL_NS = 4_535_599_000
TOTAL_NS = LOAD_NS + PROMPT_EVAL_NS + EVAL_NS + 4_103_583

Reply = tuple[int, str, bytes]  # status, content type, body


def go_json(obj: Any, *, sort_keys: bool = False) -> bytes:
    """json.Marshal equivalent: compact, UTF-8, and HTML-escaped like Go (<, >, & and U+2028/9)."""
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=sort_keys)
    if "<" in s or ">" in s or "&" in s or "\u2028" in s or "\u2029" in s:
        s = (
            s.replace("<", "\\u003c")
            .replace(">", "\\u003e")
            .replace("&", "\\u0026")
            .replace("\u2028", "\\u2028")
            .replace("\u2029", "\\u2029")
        )
    return s.encode()


def sse(obj: Any) -> bytes:
    """One OpenAI-style SSE event: ``data: <json>\\n\\n`` (no event: or id: lines)."""
    return b"data: " + go_json(obj) + b"\n\n"


def sse_named(event: str, obj: Any, *, sort_keys: bool = False) -> bytes:
    """A named SSE event as written by the Responses and Anthropic middlewares."""
    return b"event: " + event.encode() + b"\ndata: " + go_json(obj, sort_keys=sort_keys) + b"\n\n"


_utc_cache: list[Any] = [-1, ""]  # (second, formatted) -- created_at is built for every chunk


def now_utc() -> str:
    """created_at: Go RFC3339Nano in UTC (trailing zeros of the fraction trimmed)."""
    sec, frac = divmod(time.time_ns(), 1_000_000_000)
    if _utc_cache[0] != sec:
        _utc_cache[:] = [sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))]
    f = f"{frac:09d}".rstrip("0")
    return f"{_utc_cache[1]}.{f}Z" if f else f"{_utc_cache[1]}Z"


_PLAIN = re.compile(r'[^"\\<>&\x00-\x1f\x7f-\U0010ffff]*\Z')


def json_str(text: str) -> str:
    """A JSON string literal as Go writes it; plain ASCII (the usual token) skips the encoder."""
    return f'"{text}"' if _PLAIN.match(text) else go_json(text).decode()


def local_time(ts: float) -> str:
    """modified_at / expires_at: RFC3339Nano with the server's local offset (``Z`` when UTC)."""
    dt = datetime.fromtimestamp(ts, tz=UTC).astimezone()
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{dt.microsecond:06d}".rstrip("0")
    off = dt.utcoffset()
    if not off:
        tz = "Z"
    else:
        mins = int(off.total_seconds()) // 60
        sign = "+" if mins >= 0 else "-"
        tz = f"{sign}{abs(mins) // 60:02d}:{abs(mins) % 60:02d}"
    return f"{base}.{frac}{tz}" if frac else f"{base}{tz}"


def go_float(x: Any) -> Any:
    """Go prints an integral float64 without a fraction (1.0 -> 1)."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def fake_embedding(text: str, dims: int = 8) -> list[float]:
    """Deterministic short vector; 4-decimal values so Python and Go print them identically."""
    h = sum(text.encode()) + len(text)
    return [round(((h * (i + 7) * 2654435761) % 20000 - 10000) / 10000, 4) for i in range(dims)]


def floats_to_base64(v: list[float]) -> str:
    """encoding_format=base64 on /v1/embeddings: little-endian float32."""
    return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()


def openai_error(status: int, message: str) -> dict[str, Any]:
    etype = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": etype, "param": None, "code": None}}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    etype = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    return {
        "type": "error",
        "error": {"type": etype, "message": message},
        "request_id": "req_" + secrets.token_hex(12),
    }


def native_metrics(usage: tuple[int, int]) -> dict[str, int]:
    """api.Metrics with omitempty: a zero count is absent, not 0."""
    m: dict[str, int] = {"total_duration": TOTAL_NS, "load_duration": LOAD_NS}
    if usage[0]:
        m["prompt_eval_count"] = usage[0]
    m["prompt_eval_duration"] = PROMPT_EVAL_NS
    if usage[1]:
        m["eval_count"] = usage[1]
    m["eval_duration"] = EVAL_NS
    return m


class GenFormat:
    """How one inference route renders a generation of N content chunks.

    The server drives it: ``chunk(i, text)`` for each content chunk, then ``final()``;
    on an injected failure ``mid_error()`` (after >= 1 chunk), ``pre_error()`` (before
    the first byte, or any failure when not streaming).  ``single(text)`` is the
    stream:false answer.
    """

    stream_content_type = NDJSON_CT
    stream_headers: dict[str, str] = {}

    def __init__(self, model: str, usage: tuple[int, int], done_reason: str) -> None:
        self.model = model
        self.usage = usage
        self.done_reason = done_reason

    def chunk(self, i: int, text: str) -> bytes:
        raise NotImplementedError

    def final(self) -> bytes:
        raise NotImplementedError

    def mid_error(self) -> bytes:
        return b""

    def pre_error(self, status: int = 500, message: str = ERROR_RUNNING) -> Reply:
        return status, JSON_CT_PLAIN, go_json(openai_error(status, message)) + b"\n"

    def single(self, text: str) -> Reply:
        raise NotImplementedError

    def single_error(self, status: int = 500, message: str = ERROR_RUNNING) -> Reply:
        return self.pre_error(status, message)


class NativeFormat(GenFormat):
    """/api/generate and /api/chat NDJSON records (api.GenerateResponse / api.ChatResponse)."""

    def __init__(
        self,
        kind: str,
        model: str,
        usage: tuple[int, int],
        done_reason: str,
        *,
        context: bool = True,
    ) -> None:
        super().__init__(model, usage, done_reason)
        self.chat = kind == "chat"
        self.context = context and not self.chat
        self._head = '{"model":' + json_str(model) + ',"created_at":"'
        self._open = '","message":{"role":"assistant","content":' if self.chat else '","response":'
        self._close = '},"done":false}\n' if self.chat else ',"done":false}\n'

    def chunk(self, i: int, text: str) -> bytes:
        # Hot path for benchmarks: string assembly instead of a dict through json.dumps.
        return (self._head + now_utc() + self._open + json_str(text) + self._close).encode()

    def done_record(self, text: str) -> dict[str, Any]:
        rec: dict[str, Any] = {"model": self.model, "created_at": now_utc()}
        if self.chat:
            rec["message"] = {"role": "assistant", "content": text}
        else:
            rec["response"] = text
        rec["done"] = True
        rec["done_reason"] = self.done_reason
        if self.done_reason in ("load", "unload"):
            return rec
        if self.context:
            rec["context"] = [1, 2, 3]
        rec.update(native_metrics(self.usage))
        return rec

    def final(self) -> bytes:
        return go_json(self.done_record("")) + b"\n"

    def mid_error(self) -> bytes:
        return go_json({"error": ERROR_RUNNING}) + b"\n"  # json.NewEncoder(...).Encode

    def pre_error(self, status: int = 500, message: str = ERROR_RUNNING) -> Reply:
        return status, JSON_CT_PLAIN, go_json({"error": message})

    def single(self, text: str) -> Reply:
        return 200, JSON_CT, go_json(self.done_record(text))

    def single_error(self, status: int = 500, message: str = ERROR_RUNNING) -> Reply:
        return status, JSON_CT, go_json({"error": message})


class OpenAIChatFormat(GenFormat):
    """/v1/chat/completions (ChatWriter, v0.32.10+: role on the first delta, own finish chunk)."""

    stream_content_type = SSE_CT

    def __init__(
        self, model: str, usage: tuple[int, int], done_reason: str, *, include_usage: bool
    ) -> None:
        super().__init__(model, usage, done_reason)
        self.include_usage = include_usage
        self.id = f"chatcmpl-{random.randrange(999)}"
        self.created = int(time.time())  # pinned for the whole stream
        self._first = True

    def _chunk(
        self, delta: dict[str, Any], finish: str | None, model: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model if model is None else model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def _delta(self, text: str) -> dict[str, Any]:
        d = {"role": "assistant", "content": text} if self._first else {"content": text}
        self._first = False
        return d

    def _usage(self) -> dict[str, int]:
        p, c = self.usage
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chunk(self, i: int, text: str) -> bytes:
        return sse(self._chunk(self._delta(text), None))

    def final(self) -> bytes:
        out = b""
        if self._first:  # a wholly empty completion still opens with a role chunk
            out += sse(self._chunk(self._delta(""), None))
        fin = self._chunk({}, self.done_reason or "stop")
        out += sse(fin)
        if self.include_usage:
            fin["choices"] = []
            fin["usage"] = self._usage()
            out += sse(fin)
        return out + b"data: [DONE]\n\n"

    def mid_error(self) -> bytes:
        # The native {"error":..} line decoded as a ChatResponse: empty content, no model;
        # then the stream ends with no finish chunk and no [DONE].
        return sse(self._chunk(self._delta(""), None, model=""))

    def single(self, text: str) -> Reply:
        body = {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": self.done_reason or None,
                }
            ],
            "usage": self._usage(),
        }
        return 200, JSON_CT_PLAIN, go_json(body) + b"\n"


class OpenAICompletionFormat(GenFormat):
    """/v1/completions (CompleteWriter): a chunk per native record, finish on the empty last."""

    stream_content_type = SSE_CT

    def __init__(
        self, model: str, usage: tuple[int, int], done_reason: str, *, include_usage: bool
    ) -> None:
        super().__init__(model, usage, done_reason)
        self.include_usage = include_usage
        self.id = f"cmpl-{random.randrange(999)}"

    def _chunk(self, text: str, finish: str | None, model: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            "model": self.model if model is None else model,
            "system_fingerprint": "fp_ollama",
        }
        if self.include_usage:
            c["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return c

    def _usage(self) -> dict[str, int]:
        p, c = self.usage
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chunk(self, i: int, text: str) -> bytes:
        return sse(self._chunk(text, None))

    def final(self) -> bytes:
        c = self._chunk("", self.done_reason or None)
        out = sse(c)
        if self.include_usage:
            c["choices"] = []
            c["usage"] = self._usage()
            out += sse(c)
        return out + b"data: [DONE]\n\n"

    def mid_error(self) -> bytes:
        return sse(self._chunk("", None, model=""))

    def single(self, text: str) -> Reply:
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": text, "index": 0, "finish_reason": self.done_reason or None}],
            "usage": self._usage(),
        }
        return 200, JSON_CT_PLAIN, go_json(body) + b"\n"


class ResponsesFormat(GenFormat):
    """/v1/responses (ResponsesStreamConverter).  Event payloads are Go maps: sorted keys."""

    stream_content_type = SSE_CT
    stream_headers = {"Cache-Control": "no-cache", "Connection": "keep-alive"}

    def __init__(
        self, model: str, usage: tuple[int, int], done_reason: str, *, request: dict[str, Any]
    ) -> None:
        super().__init__(model, usage, done_reason)
        self.request = request
        self.id = f"resp_{random.randrange(999999)}"
        self.item_id = f"msg_{random.randrange(999999)}"
        self._seq = 0
        self._first = True
        self._started = False
        self._text = ""

    def _ev(self, name: str, data: dict[str, Any]) -> bytes:
        data["type"] = name
        data["sequence_number"] = self._seq
        self._seq += 1
        return sse_named(name, data, sort_keys=True)

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        content: list[Any] = [] if text is None else [self._part(text)]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _usage(self) -> dict[str, Any]:
        p, c = self.usage
        return {
            "input_tokens": p,
            "output_tokens": c,
            "total_tokens": p + c,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    def _response(
        self, status: str, output: list[Any], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        r = self.request
        reasoning: dict[str, Any] = r["reasoning"] if isinstance(r.get("reasoning"), dict) else {}
        fmt = (r.get("text") or {}).get("format") if isinstance(r.get("text"), dict) else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": None,
            "status": status,
            "incomplete_details": None,
            "model": self.model,
            "previous_response_id": None,
            "instructions": r.get("instructions") or None,
            "output": output,
            "error": None,
            "tools": r.get("tools") or [],
            "tool_choice": "auto",
            "truncation": r.get("truncation") or "disabled",
            "parallel_tool_calls": True,
            "text": {"format": fmt or {"type": "text"}},
            "top_p": go_float(r.get("top_p") if r.get("top_p") is not None else 1),
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "top_logprobs": 0,
            "temperature": go_float(
                r.get("temperature") if r.get("temperature") is not None else 1
            ),
            "reasoning": (
                {
                    "effort": reasoning.get("effort") or None,
                    "summary": reasoning.get("summary") or None,
                }
                if reasoning.get("effort") or reasoning.get("summary")
                else None
            ),
            "usage": usage,
            "max_output_tokens": r.get("max_output_tokens"),
            "max_tool_calls": None,
            "store": False,
            "background": bool(r.get("background")),
            "service_tier": "default",
            "metadata": {},
            "safety_identifier": None,
            "prompt_cache_key": None,
        }

    def _opening(self) -> bytes:
        if not self._first:
            return b""
        self._first = False
        return self._ev(
            "response.created", {"response": self._response("in_progress", [], None)}
        ) + self._ev("response.in_progress", {"response": self._response("in_progress", [], None)})

    def chunk(self, i: int, text: str) -> bytes:
        out = self._opening()
        if not self._started:
            self._started = True
            out += self._ev(
                "response.output_item.added",
                {"output_index": 0, "item": self._item("in_progress", None)},
            )
            out += self._ev(
                "response.content_part.added",
                {
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": self._part(""),
                },
            )
        self._text += text
        return out + self._ev(
            "response.output_text.delta",
            {
                "item_id": self.item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            },
        )

    def final(self) -> bytes:
        out = self._opening()
        output: list[Any] = []
        if self._started:
            t = self._text
            out += self._ev(
                "response.output_text.done",
                {
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "text": t,
                    "logprobs": [],
                },
            )
            out += self._ev(
                "response.content_part.done",
                {
                    "item_id": self.item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "part": self._part(t),
                },
            )
            out += self._ev(
                "response.output_item.done", {"output_index": 0, "item": self._item("completed", t)}
            )
            output = [self._item("completed", t)]
        resp = self._response("completed", output, self._usage())
        resp["completed_at"] = int(time.time())
        return out + self._ev("response.completed", {"response": resp})

    def single(self, text: str) -> Reply:
        # ToResponse: a Go struct, so declaration order (not sorted) and completed_at set.
        body = self._response("completed", [self._item("completed", text)], self._usage())
        body["completed_at"] = int(time.time())
        if body["reasoning"] is not None:
            body["reasoning"] = {k: v for k, v in body["reasoning"].items() if v is not None}
        return 200, JSON_CT_PLAIN, go_json(body) + b"\n"


class AnthropicFormat(GenFormat):
    """/v1/messages (anthropic.StreamConverter): message_start ... message_delta, message_stop."""

    stream_content_type = SSE_CT
    stream_headers = {"Cache-Control": "no-cache", "Connection": "keep-alive"}

    def __init__(
        self, model: str, usage: tuple[int, int], done_reason: str, *, estimated_input: int
    ) -> None:
        super().__init__(model, usage, done_reason)
        self.id = "msg_" + secrets.token_hex(12)
        self.estimated_input = estimated_input
        self._first = True
        self._text_started = False

    def _stop_reason(self) -> str:
        return {"stop": "end_turn", "length": "max_tokens", "": ""}.get(
            self.done_reason, "stop_sequence"
        )

    def _start(self, input_tokens: int) -> bytes:
        self._first = False
        msg = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "usage": {"input_tokens": input_tokens, "output_tokens": 0},
        }
        return sse_named("message_start", {"type": "message_start", "message": msg})

    def chunk(self, i: int, text: str) -> bytes:
        out = self._start(self.estimated_input) if self._first else b""
        if not self._text_started:
            self._text_started = True
            out += sse_named(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        return out + sse_named(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": text},
            },
        )

    def final(self) -> bytes:
        out = self._start(self.usage[0]) if self._first else b""
        if self._text_started:
            out += sse_named("content_block_stop", {"type": "content_block_stop", "index": 0})
        delta = {"stop_reason": self._stop_reason()} if self._stop_reason() else {}
        out += sse_named(
            "message_delta",
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"input_tokens": self.usage[0], "output_tokens": self.usage[1]},
            },
        )
        return out + sse_named("message_stop", {"type": "message_stop"})

    def pre_error(self, status: int = 500, message: str = ERROR_RUNNING) -> Reply:
        return status, JSON_CT_PLAIN, go_json(anthropic_error(status, message)) + b"\n"

    def single(self, text: str) -> Reply:
        body: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": text}] if text else None,
        }
        if self._stop_reason():
            body["stop_reason"] = self._stop_reason()
        body["usage"] = {"input_tokens": self.usage[0], "output_tokens": self.usage[1]}
        return 200, JSON_CT_PLAIN, go_json(body) + b"\n"


class TranscriptionFormat(GenFormat):
    """/v1/audio/transcriptions (TranscriptionWriter): never streams; JSON or text/plain."""

    def __init__(
        self, model: str, usage: tuple[int, int], done_reason: str, *, response_format: str
    ) -> None:
        super().__init__(model, usage, done_reason)
        self.response_format = response_format

    def single(self, text: str) -> Reply:
        text = text.strip()
        if self.response_format == "text":
            return 200, "text/plain", text.encode()
        return 200, JSON_CT_PLAIN, go_json({"text": text}) + b"\n"
