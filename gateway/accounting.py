"""Token accounting: the upstream's own usage figures, read from the response on the side.

Native streams carry them in the final `done:true` record, OpenAI in `usage`, Responses in
`response.completed`, Anthropic in `message_start`/`message_delta`. The reader is cheap per
chunk: it keeps only the bytes after the last newline and looks for a marker in complete
lines with `bytes.find`; only the one line holding the marker is parsed as JSON.

`/v1` streams carry no usage unless the request asks (`stream_options.include_usage`), so
when the client did not, `install_accounting` asks upstream for it and a rewriting tap
removes what Ollama then adds, so the client sees the stream it would have seen.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

from gateway.context import RequestContext, Usage
from gateway.policy.decode import content_codings
from gateway.relay import add_tap

NATIVE, NATIVE_EMBED, OPENAI, OPENAI_EMBED, RESPONSES, ANTHROPIC = (
    "native",
    "native_embed",
    "openai",
    "openai_embed",
    "responses",
    "anthropic",
)
INFERENCE_ROUTES: dict[str, str] = {
    "/api/generate": NATIVE,
    "/api/chat": NATIVE,
    "/api/embed": NATIVE_EMBED,
    "/api/embeddings": NATIVE_EMBED,
    "/v1/chat/completions": OPENAI,
    "/v1/completions": OPENAI,
    "/v1/embeddings": OPENAI_EMBED,
    "/v1/responses": RESPONSES,
    "/v1/messages": ANTHROPIC,
}
INJECTABLE = frozenset({"/v1/chat/completions", "/v1/completions"})

# Markers of the one line worth parsing (Go writes compact JSON: no spaces).
_MARKERS: dict[str, tuple[bytes, ...]] = {
    NATIVE: (b'"done":true',),
    NATIVE_EMBED: (b'"done":true',),
    OPENAI: (b'"usage":{',),
    OPENAI_EMBED: (b'"usage":{',),
    RESPONSES: (b'"response.completed"',),
    ANTHROPIC: (b'"message_start"', b'"message_delta"'),
}
USAGE_MARKER = b'"usage":{'
# /v1/completions with include_usage puts this on every chunk: nothing to learn from it.
ZERO_USAGE = b'"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
_ZERO_USAGE_SUFFIX = b"," + ZERO_USAGE + b"}"
# Counts of a body too large to parse (or an embedding, all numbers) are read from its end,
# where every format puts them; the last match wins.
_TAIL_PATTERNS: dict[str, tuple[re.Pattern[bytes], re.Pattern[bytes] | None]] = {
    NATIVE: (re.compile(rb'"prompt_eval_count":(\d+)'), re.compile(rb'"eval_count":(\d+)')),
    NATIVE_EMBED: (re.compile(rb'"prompt_eval_count":(\d+)'), None),
    OPENAI: (re.compile(rb'"prompt_tokens":(\d+)'), re.compile(rb'"completion_tokens":(\d+)')),
    OPENAI_EMBED: (re.compile(rb'"prompt_tokens":(\d+)'), None),
    RESPONSES: (re.compile(rb'"input_tokens":(\d+)'), re.compile(rb'"output_tokens":(\d+)')),
    ANTHROPIC: (re.compile(rb'"input_tokens":(\d+)'), re.compile(rb'"output_tokens":(\d+)')),
}
TAIL_BYTES = 4096
WHOLE_MAX = 16 * 1024 * 1024  # a single JSON answer parsed whole up to this size
HOLD_MAX = 8 * 1024 * 1024  # longest line/event held back; beyond, it is passed on unread

_OFF, _LINES, _WHOLE, _TAIL = range(4)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class UsageTap:
    """Reads usage without touching the bytes: `feed` returns the very chunk it was given."""

    __slots__ = (
        "ctx",
        "kind",
        "rewrites",
        "_mode",
        "_lines_per_record",
        "_markers",
        "_held",
        "_held_len",
        "_tail",
        "_usage",
    )

    def __init__(self, ctx: RequestContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        self.rewrites = False
        self._mode = _OFF
        self._markers = _MARKERS[kind]
        self._held: list[bytes] = []
        self._held_len = 0
        self._tail = b""
        self._usage: Usage | None = None
        self._lines_per_record = 1

    def begin(self, status: int, headers: CIMultiDictProxy[str]) -> None:
        if not 200 <= status < 300:
            return  # errors carry no usage
        ctype = headers.get("Content-Type", "")
        if "ndjson" in ctype or "event-stream" in ctype:
            self._mode = _LINES
            self._lines_per_record = 2 if "event-stream" in ctype else 1
        elif self.kind in (NATIVE_EMBED, OPENAI_EMBED):
            self._mode = _TAIL  # a vector body: only its end matters
        else:
            self._mode = _WHOLE

    def feed(self, chunk: bytes) -> bytes:
        mode = self._mode
        if mode == _LINES:
            # Each streamed record is about one generated token: what a client that leaves
            # before the final record is charged (it cannot dodge its budget that way).
            self.ctx.streamed_tokens += chunk.count(b"\n") // self._lines_per_record
            self._scan(chunk)
        elif mode == _WHOLE:
            self._held.append(chunk)
            self._held_len += len(chunk)
            if self._held_len > WHOLE_MAX:  # too big to parse: read the counts from the end
                self._tail = b"".join(self._held)[-TAIL_BYTES:]
                self._held.clear()
                self._mode = _TAIL
        elif mode == _TAIL:
            self._tail = chunk if len(chunk) >= TAIL_BYTES else self._tail[-TAIL_BYTES:] + chunk
        return chunk

    def end(self) -> bytes:
        mode = self._mode
        if mode in (_LINES, _WHOLE) and self._held:
            last = b"".join(self._held)  # a last line without a newline, or the whole body
            self._held.clear()
            if mode == _WHOLE or any(m in last for m in self._markers):
                self._line(last)
        elif mode == _TAIL:
            self._from_tail(self._tail[-TAIL_BYTES:])
        self._mode = _OFF
        return b""

    # -- line scanning -----------------------------------------------------------------

    def _scan(self, chunk: bytes) -> None:
        newline = chunk.rfind(b"\n")
        if newline < 0:
            self._hold(chunk)
            return
        if self._held:
            self._held.append(chunk[: newline + 1])
            block, end = b"".join(self._held), None
            self._held.clear()
            self._held_len = 0
        else:
            block, end = chunk, newline + 1  # no copy: search the chunk in place
        stop = len(block) if end is None else end
        for marker in self._markers:
            at = block.find(marker, 0, stop)
            while at >= 0:
                start = block.rfind(b"\n", 0, at) + 1
                line_end = block.find(b"\n", at, stop)
                self._line(block[start:line_end])
                at = block.find(marker, line_end, stop)
        if newline + 1 < len(chunk):
            self._hold(chunk[newline + 1 :])

    def _hold(self, part: bytes) -> None:
        self._held.append(part)
        self._held_len += len(part)
        if self._held_len > HOLD_MAX:  # a runaway line: stop reading it, keep memory flat
            self._held.clear()
            self._held_len = 0

    def _line(self, line: bytes) -> None:
        """Parse one line holding a marker (an SSE `data:` line or an NDJSON record)."""
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].lstrip()
        elif line.startswith(b"event:") or not line:
            return
        if ZERO_USAGE in line:
            return
        try:
            record = json.loads(line)
        except ValueError:
            return
        if isinstance(record, dict):
            self._absorb(record)

    # -- reading the figures -----------------------------------------------------------

    def _absorb(self, record: dict[str, Any]) -> None:
        kind = self.kind
        if kind in (NATIVE, NATIVE_EMBED):
            if record.get("done") is True or "prompt_eval_count" in record:
                eval_ns = _count(record.get("eval_duration"))
                self._set(
                    _count(record.get("prompt_eval_count")),
                    _count(record.get("eval_count")),
                    record.get("model"),
                    eval_ns / 1e9 if eval_ns else None,
                )
        elif kind in (OPENAI, OPENAI_EMBED):
            usage = record.get("usage")
            if isinstance(usage, dict):
                self._set(
                    _count(usage.get("prompt_tokens")),
                    _count(usage.get("completion_tokens")),
                    record.get("model"),
                )
        elif kind == RESPONSES:
            response = record.get("response") if "response" in record else record
            usage = response.get("usage") if isinstance(response, dict) else None
            if isinstance(usage, dict) and isinstance(response, dict):
                self._set(
                    _count(usage.get("input_tokens")),
                    _count(usage.get("output_tokens")),
                    response.get("model"),
                )
        elif kind == ANTHROPIC:
            self._absorb_anthropic(record)

    def _absorb_anthropic(self, record: dict[str, Any]) -> None:
        kind = record.get("type")
        if kind == "message_start":
            message = record.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict) and isinstance(message, dict):
                # An estimate until message_delta gives the real count.
                self._set(_count(usage.get("input_tokens")), 0, message.get("model"))
            return
        usage = record.get("usage")
        if not isinstance(usage, dict):
            return
        previous = self._usage.prompt_tokens if self._usage else 0
        prompt = _count(usage["input_tokens"]) if "input_tokens" in usage else previous
        self._set(prompt, _count(usage.get("output_tokens")), record.get("model"))

    def _from_tail(self, tail: bytes) -> None:
        prompt_re, completion_re = _TAIL_PATTERNS[self.kind]
        prompts = prompt_re.findall(tail)
        completions = completion_re.findall(tail) if completion_re is not None else []
        if prompts or completions:
            self._set(
                int(prompts[-1]) if prompts else 0, int(completions[-1]) if completions else 0, None
            )

    def _set(
        self, prompt: int, completion: int, model: Any, eval_seconds: float | None = None
    ) -> None:
        usage = self._usage
        if usage is None:
            usage = self._usage = Usage()
            self.ctx.usage = usage
        usage.prompt_tokens = prompt
        usage.completion_tokens = completion
        if eval_seconds is not None:
            usage.eval_seconds = eval_seconds
        if isinstance(model, str) and model:
            usage.model = model
        elif usage.model is None:
            usage.model = _requested_model(self.ctx)


def _requested_model(ctx: RequestContext) -> str | None:
    if ctx.model:
        return ctx.model
    body = ctx.json
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else None


class UsageRewriteTap(UsageTap):
    """For a `/v1` stream whose include_usage we added: strip what Ollama added for it.

    Works on whole SSE events: holds back only an incomplete event, passes every event
    without the usage marker byte for byte (the same object when a chunk is one whole
    event), drops the extra `choices: []` usage event and removes the zero `usage` object
    `/v1/completions` puts on every chunk.
    """

    __slots__ = ()

    def begin(self, status: int, headers: CIMultiDictProxy[str]) -> None:
        super().begin(status, headers)
        # Only a stream was changed; an error or JSON answer passes untouched (and keeps
        # its Content-Length).
        self.rewrites = self._mode == _LINES and "event-stream" in headers.get("Content-Type", "")
        if not self.rewrites and self._mode == _LINES:
            self._mode = _OFF

    def feed(self, chunk: bytes) -> bytes:
        if not self.rewrites:
            return super().feed(chunk)
        if self._held:
            self._held.append(chunk)
            buffer = b"".join(self._held)
            self._held.clear()
            self._held_len = 0
        else:
            buffer = chunk
        cut = buffer.rfind(b"\n\n")
        if cut < 0:
            return self._hold_event(buffer)
        end = cut + 2
        if buffer.find(USAGE_MARKER, 0, end) < 0:
            out = buffer if end == len(buffer) else buffer[:end]
        else:
            out = self._strip(buffer[:end])
        if end < len(buffer):
            out += self._hold_event(buffer[end:])
        return out

    def end(self) -> bytes:
        if not self.rewrites:
            return super().end()
        rest = b"".join(self._held)  # an unfinished last event: passed on as it came
        self._held.clear()
        return rest

    def _hold_event(self, part: bytes) -> bytes:
        if self._held_len + len(part) > HOLD_MAX:  # runaway event: pass it on, unread
            return part
        self._held.append(part)
        self._held_len += len(part)
        return b""

    def _strip(self, block: bytes) -> bytes:
        events = block.split(b"\n\n")[:-1]
        kept: list[bytes] = []
        for event in events:
            if USAGE_MARKER in event:
                stripped = self._strip_event(event)
                if stripped is None:
                    continue
                event = stripped
            kept.append(event)
            kept.append(b"\n\n")
        return b"".join(kept)

    def _strip_event(self, event: bytes) -> bytes | None:
        """The event without what include_usage added; None to drop it whole."""
        lines = event.split(b"\n")
        for i, line in enumerate(lines):
            if not line.startswith(b"data:") or USAGE_MARKER not in line:
                continue
            if b'"choices":[]' not in line and line.endswith(_ZERO_USAGE_SUFFIX):
                lines[i] = line[: -len(_ZERO_USAGE_SUFFIX)] + b"}"
                continue
            try:
                record = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            self._absorb(record)
            if record.get("choices") == []:
                return None  # the usage-only event Ollama added
            lines[i] = _remove_usage(line)
        return b"\n".join(lines)


def _remove_usage(line: bytes) -> bytes:
    """Cut the `,"usage":{...}` member out of a JSON line (its object holds no strings
    with braces: only numbers and nested count objects)."""
    start = line.rfind(b',"usage":{')
    if start < 0:
        return line
    depth = 0
    for i in range(start + len(b',"usage":'), len(line)):
        byte = line[i]
        if byte == 0x7B:  # {
            depth += 1
        elif byte == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return line[:start] + line[i + 1 :]
    return line


def install_accounting(request: web.Request, ctx: RequestContext) -> None:
    """Attach the usage reader to an inference request (every one: metrics read it too)."""
    if ctx.method != "POST":
        return
    kind = INFERENCE_ROUTES.get(ctx.path)
    if kind is None:
        return
    if ctx.path in INJECTABLE and _ask_for_usage(request, ctx):
        add_tap(ctx, UsageRewriteTap(ctx, kind))
    else:
        add_tap(ctx, UsageTap(ctx, kind))


def _ask_for_usage(request: web.Request, ctx: RequestContext) -> bool:
    """Set `stream_options.include_usage` on a `/v1` stream that did not ask for it.

    Ollama binds JSON keys as Go does: case-insensitively, the last spelling winning. The
    body is read here the same way, or `"Stream": true`, or a `"Stream_Options"` after
    `"stream_options"`, would stream with no usage and never be charged to a token budget.
    """
    body = ctx.json
    if not isinstance(body, dict) or not any(v is True for v in _go_values(body, "stream")):
        return False
    if content_codings(request.headers.getall("Content-Encoding", [])):  # `identity` is plain
        return False  # the body we would re-encode is not plain JSON
    options = _go_values(body, "stream_options")
    if any(o is not None and not isinstance(o, dict) for o in options):
        return False  # malformed: Ollama refuses it (400), nothing is generated
    given = [o for o in options if isinstance(o, dict)]
    asked = _go_values(given[0], "include_usage") if len(options) == 1 and given else []
    if len(asked) == 1 and asked[0] is True:
        return False  # the client asked, unambiguously: it sees the usage, and we read it
    # One unambiguous spelling replaces every variant, so Go can only read `true`.
    changed = {k: v for k, v in body.items() if k.casefold() != "stream_options"}
    kept = {k: v for o in given for k, v in o.items() if k.casefold() != "include_usage"}
    changed["stream_options"] = {**kept, "include_usage": True}
    ctx.json = changed
    ctx.body = json.dumps(changed, ensure_ascii=False, separators=(",", ":")).encode()
    return True


def _go_values(obj: dict[str, Any], field: str) -> list[Any]:
    """Every value Go's encoding/json could bind to `field` (keys match case-insensitively)."""
    return [value for key, value in obj.items() if key.casefold() == field]
