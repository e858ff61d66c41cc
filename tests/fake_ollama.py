"""A faithful fake Ollama server for tests and benchmarks.

A real aiohttp server on a real socket (127.0.0.1, OS-chosen port) that reproduces
Ollama's wire behaviour as described in /work/shared/ollama-api.md: exact content
types and bytes, late headers, NDJSON/SSE framing, the loopback Host check and CORS
403s, gin's 404/405 texts, blob uploads hashed while streaming, and injectable
failures (mid-stream error line, crash, hang).

Opt-in Ollama scheduling (``parallel=P``, ``model_parallel={"all-minilm": 1}``): each model
runs at most P inference requests at once and queues the rest FIFO with no depth limit, as
Ollama's per-model semaphore does; ``fake.grants`` records every grant, ``fake.max_running``
the highest concurrency per model, and ``await fake.wait_for(lambda: fake.waiting(m) == 3)``
waits for a state without sleeping (``tests/fake_ollama_slots.py``).  ``usage_from_plan=True``
makes the reported token counts honest: completion tokens = content chunks generated, prompt
tokens estimated from the prompt's size.

Layout: this module holds the server, dispatch and the generation engine;
``fake_ollama_manage`` (model store, blobs), ``fake_ollama_v1`` (OpenAI/Anthropic
routes), ``fake_ollama_http`` (records, binding, Host/CORS rules) and
``fake_ollama_wire`` (byte-exact record builders) and ``fake_ollama_slots`` (per-model slots)
hold the rest.

Run standalone (benchmarks)::

    python -m tests.fake_ollama --port 11434 [--chunks N] [--chunk-delay S] [--no-host-check]
        [--parallel P] [--model-parallel NAME=P ...] [--usage-from-plan]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.fake_ollama_http import (
    KEEP_BODY_MAX,
    Abort,
    Ctx,
    Handler,
    Model,
    RecordedRequest,
    err,
    estimate_prompt_tokens,
    host_allowed,
    json_reply,
    origin_allowed,
    preflight,
    reply,
)
from tests.fake_ollama_manage import ManageRoutes
from tests.fake_ollama_slots import INFERENCE_PATHS, Grant, Slots
from tests.fake_ollama_v1 import V1Routes
from tests.fake_ollama_wire import JSON_CT, GenFormat, NativeFormat, fake_embedding, now_utc

__all__ = ["FakeOllama", "Grant", "RecordedRequest", "fake_ollama", "main"]

CORS_ORIGIN = web.RequestKey("cors_origin", str)  # set when an allowed cross-origin request passed
DEFAULT_MODELS = ["llama3.2:latest", "qwen2.5:7b", "all-minilm:latest", "gpt-oss:120b-cloud"]


class FakeOllama(ManageRoutes, V1Routes):
    """Fake Ollama: see the module docstring and /work/shared/ollama-api.md."""

    def __init__(
        self,
        *,
        models: list[str] | None = None,
        host_check: bool = True,
        chunks: int = 5,
        chunk_delay: float = 0.0,
        first_byte_delay: float = 0.0,
        version: str = "0.33.0",
        keep_requests: int | None = None,
        parallel: int | None = None,
        model_parallel: dict[str, int] | None = None,
        usage_from_plan: bool = False,
    ) -> None:
        self.host_check = host_check
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.first_byte_delay = first_byte_delay
        self.version = version
        # Beyond keep_requests records, the oldest half is dropped (long standalone benchmarks).
        self.keep_requests = keep_requests
        self.allowed_origins: list[str] = []  # like OLLAMA_ORIGINS ("*" allows all)
        self.requests: list[RecordedRequest] = []
        self.blobs: dict[str, int] = {}
        self.fail_mid_stream_after: int | None = None
        self.abort_mid_stream_after: int | None = None
        self.hang_after_chunks: int | None = None
        self.status_override: dict[str, tuple[int, Any]] = {}
        self.usage: tuple[int, int] = (26, 10)
        # Models /api/ps reports as loaded (normalised names); None: every local model.
        self.loaded: set[str] | None = None
        # True: completion tokens = content chunks generated, prompt tokens from the prompt size
        self.usage_from_plan = usage_from_plan
        # Ollama's per-model slots (None/0 everywhere: unlimited, nothing recorded)
        self.slots = Slots(parallel, model_parallel, keep=keep_requests)
        self._seq = 0
        self.url = ""
        now = time.time()
        self._models: dict[str, Model] = {}
        for i, name in enumerate(DEFAULT_MODELS if models is None else models):
            self._add_model(name, now - 3600 * (i + 1))
        self._runner: web.AppRunner | None = None
        self._gone: asyncio.Queue[RecordedRequest] = asyncio.Queue()
        self._never = asyncio.Event()
        self._active: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._routes: dict[str, dict[str, Handler]] = self._route_table()

    # ----------------------------------------------------------------- lifecycle

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> FakeOllama:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        app.on_response_prepare.append(self._add_cors_headers)
        self._runner = web.AppRunner(
            app,
            handler_cancellation=True,
            auto_decompress=False,
            access_log=None,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.url = f"http://{host}:{self._runner.addresses[0][1]}"
        return self

    async def close(self) -> None:
        self._closing = True
        for task in list(self._active):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def models(self) -> list[str]:
        return [m.name for m in self._models.values()]

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def resume(self) -> None:
        """Streams held by `hang_after_chunks` go on to their normal end; new ones aren't held.

        Lets a test keep a stream open exactly as long as it needs (no timing guesses).
        """
        self.hang_after_chunks = None
        held, self._never = self._never, asyncio.Event()
        held.set()

    # ----------------------------------------------------------------- slots

    @property
    def grants(self) -> list[Grant]:
        """Every slot grant in grant order (only with ``parallel``/``model_parallel``)."""
        return self.slots.grants

    @property
    def max_running(self) -> dict[str, int]:
        """Highest number of requests ever running at once, per normalised model name."""
        return self.slots.max_running

    def running(self, model: str) -> int:
        """Requests holding a slot of ``model`` now."""
        return self.slots.running(model)

    def waiting(self, model: str) -> int:
        """Requests queued for a slot of ``model`` now."""
        return self.slots.waiting(model)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` holds; re-checked on every slot state change.

        ``await fake.wait_for(lambda: fake.waiting("llama3.2") == 8)``; TimeoutError otherwise.
        """
        await self.slots.wait_for(predicate, timeout)

    async def _take_slot(self, ctx: Ctx, model: str) -> None:
        """Wait for a slot of ``model`` (inference routes only); held until the response ends."""
        if ctx.grant is None and self.slots.enabled and ctx.request.path in INFERENCE_PATHS:
            ctx.grant = await self.slots.acquire(ctx.request.path, model, ctx.rec, ctx.seq)

    def _usage_of(self, req: dict[str, Any], n: int) -> tuple[int, int]:
        """(prompt, completion) tokens to report for a generation of n content chunks."""
        if self.usage_from_plan:
            return estimate_prompt_tokens(req), n
        return self.usage

    async def wait_client_gone(self, timeout: float = 5.0) -> RecordedRequest:  # noqa: ASYNC109
        """Next request whose client disconnected mid-response.

        Each such request is returned once, in order; raises TimeoutError if none arrives.
        """
        return await asyncio.wait_for(self._gone.get(), timeout)

    # ----------------------------------------------------------------- dispatch

    def _route_table(self) -> dict[str, dict[str, Handler]]:
        return {
            "/": {"GET": self._root, "HEAD": self._root},
            "/api/version": {"GET": self._version, "HEAD": self._version},
            "/api/status": {"GET": self._status},
            "/api/tags": {"GET": self._tags, "HEAD": self._tags},
            "/api/ps": {"GET": self._ps},
            "/api/show": {"POST": self._show},
            "/api/generate": {"POST": self._generate},
            "/api/chat": {"POST": self._chat},
            "/api/embed": {"POST": self._embed},
            "/api/embeddings": {"POST": self._embeddings},
            "/api/pull": {"POST": self._pull},
            "/api/push": {"POST": self._push},
            "/api/create": {"POST": self._create},
            "/api/copy": {"POST": self._copy},
            "/api/delete": {"DELETE": self._delete},
            "/api/me": {"POST": self._unauthorized},
            "/api/signout": {"POST": self._unauthorized},
            "/api/experimental/web_search": {"POST": self._unauthorized},
            "/api/experimental/web_fetch": {"POST": self._unauthorized},
            "/api/experimental/model-recommendations": {"GET": self._recommendations},
            "/api/blobs/:": {"HEAD": self._blob_head, "POST": self._blob_post},
            "/api/user/keys/:": {"DELETE": self._unauthorized},
            "/v1/chat/completions": {"POST": self._v1_chat},
            "/v1/completions": {"POST": self._v1_completions},
            "/v1/embeddings": {"POST": self._v1_embeddings},
            "/v1/models": {"GET": self._v1_models},
            "/v1/models/:": {"GET": self._v1_model},
            "/v1/responses": {"POST": self._v1_responses},
            "/v1/messages": {"POST": self._v1_messages},
            "/v1/audio/transcriptions": {"POST": self._v1_transcriptions},
        }

    def _lookup(self, path: str) -> tuple[dict[str, Handler] | None, str]:
        if path in self._routes:
            return self._routes[path], ""
        head, _, tail = path.rpartition("/")
        if tail and (methods := self._routes.get(head + "/:")):
            return methods, tail
        return None, ""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, query = request.raw_path.partition("?")
        rec = RecordedRequest(request.method, raw_path, query, CIMultiDict(request.headers))
        self.requests.append(rec)
        if self.keep_requests and len(self.requests) > self.keep_requests:
            del self.requests[: len(self.requests) // 2]
        ctx = Ctx(request, rec, seq=self._seq)
        self._seq += 1
        task = asyncio.current_task()
        if task is not None:
            self._active.add(task)
        try:
            try:
                resp = await self._handle(ctx)
            except Abort as a:
                resp = a.response
            rec.status = resp.status if not ctx.server_aborted else None
            return resp
        except asyncio.CancelledError:
            if not self._closing and not ctx.server_aborted:
                self._mark_gone(rec)
            raise
        except ConnectionError:  # wrote to a client that went away (ClientConnectionResetError)
            if not ctx.server_aborted:
                self._mark_gone(rec)
            return ctx.resp or web.Response()
        finally:
            if ctx.grant is not None:
                self.slots.release(ctx.grant)
            if task is not None:
                self._active.discard(task)

    def _mark_gone(self, rec: RecordedRequest) -> None:
        if not rec.client_gone:
            rec.client_gone = True
            self._gone.put_nowait(rec)

    async def _handle(self, ctx: Ctx) -> web.StreamResponse:
        request, rec = ctx.request, ctx.rec
        path = request.path
        if not path.startswith("/api/blobs/"):  # blob bodies are streamed by their handler
            ctx.data = await request.read()
            self._fill_body(rec, ctx.data)
        if self.host_check and (denied := self._check_origin_and_host(request)) is not None:
            return denied
        if path in self.status_override:
            status, body = self.status_override[path]
            if body is None:
                return reply(status, None)
            if isinstance(body, (bytes, str)):
                return reply(status, JSON_CT, body.encode() if isinstance(body, str) else body)
            return json_reply(body, status)
        methods, ctx.param = self._lookup(path)
        if methods is None:
            if (
                path.endswith("/")
                and len(path) > 1
                and self._lookup(path.rstrip("/"))[0] is not None
            ):
                return self._redirect(request, path.rstrip("/"))  # gin RedirectTrailingSlash
            return reply(404, "text/plain", b"404 page not found")
        handler = methods.get(request.method)
        if handler is None:
            return reply(405, "text/plain", b"405 method not allowed")
        return await handler(ctx)

    @staticmethod
    def _fill_body(rec: RecordedRequest, data: bytes) -> None:
        rec.body_size = len(data)
        rec.body_sha256 = hashlib.sha256(data).hexdigest()
        rec.body = data if len(data) <= KEEP_BODY_MAX else None
        rec.body_read = True
        if data:
            with suppress(ValueError):
                rec.json = json.loads(data)

    @staticmethod
    def _redirect(request: web.Request, location: str) -> web.Response:
        code = 301 if request.method in ("GET", "HEAD") else 307
        text = "Moved Permanently" if code == 301 else "Temporary Redirect"
        body = f'<a href="{location}">{text}</a>.\n\n'
        resp = reply(
            code, "text/html; charset=utf-8", body.encode() if request.method == "GET" else b""
        )
        resp.headers["Location"] = location
        return resp

    # ------------------------------------------------------- host check and CORS

    def _check_origin_and_host(self, request: web.Request) -> web.StreamResponse | None:
        """CORS first (403 for a disallowed Origin, 204 preflight), then the loopback Host check."""
        host = request.headers.get("Host", "")
        origin = request.headers.get("Origin", "")
        if origin and origin not in (f"http://{host}", f"https://{host}"):
            if not origin_allowed(origin, self.allowed_origins):
                return reply(403, None)
            if request.method == "OPTIONS":
                return preflight(origin)
            request[CORS_ORIGIN] = origin
        allowed, named = host_allowed(host)
        if not allowed:
            return reply(403, None)
        if named and request.method == "OPTIONS":
            return reply(204, None)
        return None

    @staticmethod
    async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        if origin := request.get(CORS_ORIGIN):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    # ----------------------------------------------------- generation engine

    async def _sleep_first_byte(self) -> None:
        if self.first_byte_delay > 0:
            await asyncio.sleep(self.first_byte_delay)

    def _fault(self, i: int) -> str | None:
        if self.abort_mid_stream_after == i:
            return "abort"
        if self.hang_after_chunks == i:
            return "hang"
        if self.fail_mid_stream_after == i:
            return "fail"
        return None

    def _abort(self, ctx: Ctx) -> web.StreamResponse:
        """Simulate a crash: close the TCP connection with no terminating chunk."""
        ctx.server_aborted = True
        transport = ctx.request.transport
        if transport is not None:
            transport.close()
        return ctx.resp or web.Response()

    def _plan(self, limit: Any) -> tuple[int, str]:
        """Number of content chunks and done_reason; num_predict/max_tokens cut to "length"."""
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < self.chunks:
            return limit, "length"
        return self.chunks, "stop"

    async def _run(self, ctx: Ctx, fmt: GenFormat, n: int, stream: bool) -> web.StreamResponse:
        """Drive one generation: a model slot, first_byte_delay, n chunks, injected faults."""
        if fmt.done_reason != "load":  # a load record (empty prompt) never runs the model
            await self._take_slot(ctx, fmt.model)
        await self._sleep_first_byte()
        pieces = [f"tok{i} " for i in range(n)]
        for i in range(n + 1):
            if i > 0 and self.chunk_delay > 0:
                await asyncio.sleep(self.chunk_delay)
            fault = self._fault(i)
            if fault == "abort":
                return self._abort(ctx)
            if fault == "hang":
                await self._never.wait()
            if fault == "fail":
                if ctx.resp is None:
                    return reply(*(fmt.pre_error() if stream else fmt.single_error()))
                if data := fmt.mid_error():
                    await ctx.resp.write(data)
                return ctx.resp  # normal end of the chunked body, no done record
            if i == n:
                break
            if stream:
                resp = ctx.resp or await self._prepare_stream(ctx, fmt)
                await resp.write(fmt.chunk(i, pieces[i]))
        if not stream:
            return reply(*fmt.single("".join(pieces)))
        resp = ctx.resp or await self._prepare_stream(ctx, fmt)
        await resp.write(fmt.final())
        return resp

    async def _prepare_stream(self, ctx: Ctx, fmt: GenFormat) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": fmt.stream_content_type, **fmt.stream_headers}
        )
        resp.enable_chunked_encoding()
        ctx.resp, ctx.rec.status = resp, resp.status  # headers go out now; the body follows
        await resp.prepare(ctx.request)
        return resp

    # ------------------------------------------------------- simple routes

    async def _root(self, ctx: Ctx) -> web.StreamResponse:
        return reply(200, "text/plain; charset=utf-8", b"Ollama is running")

    async def _version(self, ctx: Ctx) -> web.StreamResponse:
        return json_reply({"version": self.version})

    async def _status(self, ctx: Ctx) -> web.StreamResponse:
        return json_reply({"cloud": {"disabled": False, "source": "none"}})

    async def _recommendations(self, ctx: Ctx) -> web.StreamResponse:
        return json_reply({"recommendations": []})

    async def _unauthorized(self, ctx: Ctx) -> web.StreamResponse:
        signin = "https://ollama.com/connect?name=fake&key=ZmFrZQ"
        return json_reply({"error": "unauthorized", "signin_url": signin}, 401)

    # ------------------------------------------------------- native inference

    def _model_or_404(self, name: Any, *, required_msg: str = "model is required") -> Model:
        if not name:
            raise err(400, required_msg)
        m = self._find(name)
        if m is None:
            raise err(404, f"model '{name}' not found")
        return m

    async def _generate(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind(
            "api.GenerateRequest",
            {
                "model": "string",
                "prompt": "string",
                "stream": "bool",
                "raw": "bool",
                "options": "object",
            },
        )
        model = req.get("model") or ""
        self._model_or_404(model)
        if not req.get("prompt") and not req.get("images"):
            await self._sleep_first_byte()
            reason = "unload" if req.get("keep_alive") in (0, "0", "0s", "0m") else "load"
            rec = {
                "model": model,
                "created_at": now_utc(),
                "response": "",
                "done": True,
                "done_reason": reason,
            }
            return json_reply(rec)
        n, reason = self._plan((req.get("options") or {}).get("num_predict"))
        usage = self._usage_of(req, n)
        fmt = NativeFormat("generate", model, usage, reason, context=not req.get("raw"))
        return await self._run(ctx, fmt, n, req.get("stream") is not False)

    async def _chat(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind(
            "api.ChatRequest",
            {"model": "string", "messages": "array", "stream": "bool", "options": "object"},
        )
        model = req.get("model") or ""
        self._model_or_404(model)
        if not req.get("messages"):
            await self._sleep_first_byte()
            reason = "unload" if req.get("keep_alive") in (0, "0", "0s", "0m") else "load"
            msg = {"role": "assistant", "content": ""}
            return json_reply(
                {
                    "model": model,
                    "created_at": now_utc(),
                    "message": msg,
                    "done": True,
                    "done_reason": reason,
                }
            )
        n, reason = self._plan((req.get("options") or {}).get("num_predict"))
        fmt = NativeFormat("chat", model, self._usage_of(req, n), reason)
        return await self._run(ctx, fmt, n, req.get("stream") is not False)

    async def _embed(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind("api.EmbedRequest", {"model": "string"})
        model = req.get("model") or ""
        self._model_or_404(model)
        inp = req.get("input")
        inputs = [inp] if isinstance(inp, str) else list(inp or [])
        if not inputs or inputs == [""]:
            await self._sleep_first_byte()
            return json_reply({"model": model, "embeddings": []})
        await self._take_slot(ctx, model)
        await self._sleep_first_byte()
        return json_reply(
            {
                "model": model,
                "embeddings": [fake_embedding(str(t)) for t in inputs],
                "total_duration": 14_143_917,
                "load_duration": 1_019_500,
                "prompt_eval_count": self._usage_of(req, 0)[0],
            }
        )

    async def _embeddings(self, ctx: Ctx) -> web.StreamResponse:
        req = ctx.bind("api.EmbeddingRequest", {"model": "string", "prompt": "string"})
        model = req.get("model") or ""
        self._model_or_404(model)
        prompt = req.get("prompt") or ""
        if prompt:
            await self._take_slot(ctx, model)
        await self._sleep_first_byte()
        return json_reply({"embedding": fake_embedding(prompt) if prompt else []})


@asynccontextmanager
async def fake_ollama(port: int = 0, **kw: Any) -> AsyncIterator[FakeOllama]:
    """``async with fake_ollama(chunks=3) as fake: ...`` -- started on a free port, closed after."""
    fake = FakeOllama(**kw)
    await fake.start(port)
    try:
        yield fake
    finally:
        await fake.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fake Ollama server (tests/benchmarks)")
    ap.add_argument("--port", type=int, default=11434)
    ap.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 in a container)")
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--chunk-delay", type=float, default=0.0)
    ap.add_argument("--first-byte-delay", type=float, default=0.0)
    ap.add_argument("--no-host-check", action="store_true")
    ap.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="inference requests per model at once, the rest wait FIFO (OLLAMA_NUM_PARALLEL;"
        " default 0: unlimited)",
    )
    ap.add_argument(
        "--model-parallel",
        action="append",
        default=[],
        metavar="NAME=P",
        help="per-model override of --parallel (repeatable)",
    )
    ap.add_argument(
        "--usage-from-plan",
        action="store_true",
        help="report completion tokens = chunks generated, prompt tokens from the prompt size",
    )
    ap.add_argument(
        "--model", action="append", help="model name (repeatable; default: the built-in list)"
    )
    args = ap.parse_args(argv)
    model_parallel: dict[str, int] = {}
    for item in args.model_parallel:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value.isdigit():
            ap.error(f"--model-parallel wants NAME=P, got {item!r}")
        model_parallel[name] = int(value)

    async def run() -> None:
        fake = FakeOllama(
            models=args.model,
            host_check=not args.no_host_check,
            chunks=args.chunks,
            chunk_delay=args.chunk_delay,
            first_byte_delay=args.first_byte_delay,
            keep_requests=10_000,
            parallel=args.parallel,
            model_parallel=model_parallel,
            usage_from_plan=args.usage_from_plan,
        )
        await fake.start(args.port, args.host)
        print(f"listening on {fake.url}", flush=True)
        stop = asyncio.Event()
        # As a container's PID 1, SIGTERM (docker stop) is ignored unless handled.
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        try:
            await stop.wait()
        finally:
            await fake.close()

    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    with suppress(KeyboardInterrupt):
        runner(run())


if __name__ == "__main__":
    main()
