"""OpenAI / Responses / Anthropic compatibility routes of the fake Ollama (``/v1/*``).

A mixin of ``tests.fake_ollama.FakeOllama``.  As in Ollama, request-binding errors come
from the middleware (gin c.JSON: charset, no newline) while model errors come from the
native handler through the compat writer (``application/json``, body ends in ``\\n``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.fake_ollama_http import (
    Abort,
    Ctx,
    Model,
    estimate_tokens,
    json_reply,
    parse_multipart,
    reply,
)
from tests.fake_ollama_wire import (
    JSON_CT_PLAIN,
    AnthropicFormat,
    OpenAIChatFormat,
    OpenAICompletionFormat,
    ResponsesFormat,
    TranscriptionFormat,
    anthropic_error,
    fake_embedding,
    floats_to_base64,
    go_json,
    openai_error,
)

if TYPE_CHECKING:
    from tests.fake_ollama_wire import GenFormat


class V1Routes:
    """/v1 handlers; generation itself runs through FakeOllama._run."""

    usage: tuple[int, int]
    usage_from_plan: bool
    chunks: int

    if TYPE_CHECKING:

        def _usage_of(self, req: dict[str, Any], n: int) -> tuple[int, int]: ...
        async def _take_slot(self, ctx: Ctx, model: str) -> None: ...

        def _find(self, name: str) -> Model | None: ...
        def _sorted_models(self) -> list[Model]: ...
        def _plan(self, limit: Any) -> tuple[int, str]: ...
        async def _sleep_first_byte(self) -> None: ...
        async def _run(
            self, ctx: Ctx, fmt: GenFormat, n: int, stream: bool
        ) -> web.StreamResponse: ...

    def _v1_check_model(self, name: Any, style: str = "openai") -> None:
        """The native handler's model checks, through the compat writer (newline, no charset)."""
        status, msg = (400, "model is required") if not name else (404, f"model '{name}' not found")
        if name and self._find(name) is not None:
            return
        err = anthropic_error(status, msg) if style == "anthropic" else openai_error(status, msg)
        raise Abort(reply(status, JSON_CT_PLAIN, go_json(err) + b"\n"))

    async def _v1_chat(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind(
            "openai.ChatCompletionRequest",
            {
                "model": "string",
                "messages": "array",
                "stream": "bool",
                "stream_options": "object",
                "max_tokens": "number",
            },
            "openai",
        )
        if not req.get("messages"):
            raise Abort(json_reply(openai_error(400, "[] is too short - 'messages'"), 400))
        self._v1_check_model(req.get("model"))
        n, reason = self._plan(req.get("max_tokens"))
        include = bool((req.get("stream_options") or {}).get("include_usage"))
        usage = self._usage_of(req, n)
        fmt = OpenAIChatFormat(req["model"], usage, reason, include_usage=include)
        return await self._run(ctx, fmt, n, bool(req.get("stream")))

    async def _v1_completions(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind(
            "openai.CompletionRequest",
            {
                "model": "string",
                "prompt": "string",
                "stream": "bool",
                "stream_options": "object",
                "max_tokens": "number",
            },
            "openai",
        )
        self._v1_check_model(req.get("model"))
        include = bool((req.get("stream_options") or {}).get("include_usage"))
        if not req.get("prompt"):  # the native load record, converted
            fmt = OpenAICompletionFormat(req["model"], (0, 0), "load", include_usage=include)
            return await self._run(ctx, fmt, 0, bool(req.get("stream")))
        n, reason = self._plan(req.get("max_tokens"))
        usage = self._usage_of(req, n)
        fmt = OpenAICompletionFormat(req["model"], usage, reason, include_usage=include)
        return await self._run(ctx, fmt, n, bool(req.get("stream")))

    async def _v1_embeddings(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind(
            "openai.EmbedRequest", {"model": "string", "encoding_format": "string"}, "openai"
        )
        enc = req.get("encoding_format") or ""
        if enc and enc.lower() not in ("float", "base64"):
            msg = (
                f"Invalid value for 'encoding_format' = {enc}. "
                "Supported values: ['float', 'base64']."
            )
            raise Abort(json_reply(openai_error(400, msg), 400))
        inp = req.get("input")
        if inp == "":
            inp = [""]
        if inp is None or inp == []:
            raise Abort(json_reply(openai_error(400, "invalid input"), 400))
        self._v1_check_model(req.get("model"))
        await self._take_slot(ctx, req["model"])
        await self._sleep_first_byte()
        inputs = [inp] if isinstance(inp, str) else list(inp)
        data = []
        for i, t in enumerate(inputs):
            v = fake_embedding(str(t))
            emb: Any = floats_to_base64(v) if enc.lower() == "base64" else v
            data.append({"object": "embedding", "embedding": emb, "index": i})
        prompt_tokens = self._usage_of(req, 0)[0]
        body = {
            "object": "list",
            "data": data,
            "model": req["model"],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return reply(200, JSON_CT_PLAIN, go_json(body) + b"\n")

    @staticmethod
    def _owned_by(name: str) -> str:
        parts = name.split("/")
        return parts[-2] if len(parts) >= 2 else "library"

    async def _v1_models(self, ctx: Ctx) -> web.StreamResponse:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": int(m.modified),
                "owned_by": self._owned_by(m.name),
            }
            for m in self._sorted_models()
        ]
        return reply(200, JSON_CT_PLAIN, go_json({"object": "list", "data": data or None}) + b"\n")

    async def _v1_model(self, ctx: Ctx) -> web.StreamResponse:
        self._v1_check_model(ctx.param)
        m = self._find(ctx.param)
        assert m is not None
        body = {
            "id": ctx.param,
            "object": "model",
            "created": int(m.modified),
            "owned_by": self._owned_by(ctx.param),
        }
        return reply(200, JSON_CT_PLAIN, go_json(body) + b"\n")

    async def _v1_responses(self, ctx: Ctx) -> web.StreamResponse:
        if ctx.request.headers.get("Content-Encoding") == "zstd":
            try:
                import zstandard

                ctx.data = zstandard.ZstdDecompressor().decompressobj().decompress(ctx.data)
            except Exception:
                raise Abort(
                    json_reply(openai_error(400, "failed to decompress zstd body"), 400)
                ) from None
        req = ctx.bind(
            "openai.ResponsesRequest",
            {
                "model": "string",
                "stream": "bool",
                "instructions": "string",
                "max_output_tokens": "number",
            },
            "openai",
        )
        self._v1_check_model(req.get("model"))
        n, reason = self._plan(req.get("max_output_tokens"))
        fmt = ResponsesFormat(req["model"], self._usage_of(req, n), reason, request=req)
        return await self._run(ctx, fmt, n, req.get("stream") is True)

    async def _v1_messages(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind(
            "anthropic.MessagesRequest",
            {"model": "string", "max_tokens": "number", "messages": "array", "stream": "bool"},
            "anthropic",
        )
        for ok, msg in (
            (req.get("model"), "model is required"),
            ((req.get("max_tokens") or 0) > 0, "max_tokens is required and must be positive"),
            (req.get("messages"), "messages is required"),
        ):
            if not ok:
                raise Abort(json_reply(anthropic_error(400, msg), 400))
        self._v1_check_model(req["model"], "anthropic")
        n, reason = self._plan(req["max_tokens"])
        fmt = AnthropicFormat(
            req["model"], self._usage_of(req, n), reason, estimated_input=estimate_tokens(req)
        )
        return await self._run(ctx, fmt, n, bool(req.get("stream")))

    async def _v1_transcriptions(self, ctx: Ctx) -> web.StreamResponse:
        def bad(msg: str) -> Abort:
            return Abort(json_reply(openai_error(400, msg), 400))

        ctype = ctx.request.headers.get("Content-Type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise bad(
                "failed to parse multipart form: request Content-Type isn't multipart/form-data"
            )
        fields, files = parse_multipart(ctype, ctx.data)
        model = fields.get("model", "")
        if not model:
            raise bad("model is required")
        if "file" not in files:
            raise bad("file is required: http: no such file")
        if not files["file"]:
            raise bad("audio file is empty")
        self._v1_check_model(model)
        fmt = TranscriptionFormat(
            model, self.usage, "stop", response_format=fields.get("response_format", "")
        )
        return await self._run(ctx, fmt, self.chunks, stream=False)
