"""Reading a request body for authorisation: bounded, decompressed, parsed like Ollama.

The bytes read are kept in `ctx.body` and forwarded exactly as received (compressed or
not); only a private copy is decompressed and parsed. Client mistakes are 400/413/415,
never 500, and a body that cannot be read is never forwarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import unquote

from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge, RequestTimeout
from gateway.http_server import send_continue
from gateway.policy.decode import (
    DecodedTooLarge,
    DecodeError,
    UnsupportedEncoding,
    content_codings,
    decode_body,
)
from gateway.policy.fields import BodyError, BodySpec, json_candidates, parse_json_object
from gateway.policy.multipart import form_values

READ_CHUNK = 64 * 1024
OFFLOAD_BYTES = 1024 * 1024  # parse bigger bodies off the event loop
T = TypeVar("T")


async def read_bounded(request: web.Request, limit: int, idle_timeout: float) -> bytes:
    """The whole body, or 413 as soon as it exceeds `limit` (never reading much past it).

    No byte for `idle_timeout` seconds: 408 (nothing has reached Ollama yet), and the
    connection is closed (the rest of the body may still be on its way).
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge("request body too large", reason="body_size")
    await send_continue(request)  # limits, authentication and the route passed: send it
    chunks: list[bytes] = []
    total = 0
    while True:
        try:  # a few reads per JSON body: one timer each is cheap here
            async with asyncio.timeout(idle_timeout):
                chunk = await request.content.read(min(READ_CHUNK, limit + 1 - total))
        except TimeoutError:
            raise RequestTimeout(
                "request body timed out", reason="client_body_timeout", close=True
            ) from None
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:  # chunked uploads declare no length: count as they come
            raise PayloadTooLarge("request body too large", reason="body_size")
        chunks.append(chunk)


async def _off_loop_if_big(size: int, func: Callable[..., T], *args: object) -> T:
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(func, *args)
    return func(*args)


async def body_model_names(
    request: web.Request, ctx: RequestContext, spec: BodySpec, limit: int
) -> list[str]:
    """Read the body into `ctx.body` (and `ctx.json`); every model name it carries."""
    body = await read_bounded(request, limit, ctx.state.config.client_body_timeout)
    ctx.body = body
    ctx.bytes_in = len(body)
    if not body:
        return []
    codings = content_codings(request.headers.getall("Content-Encoding", []))
    try:
        plain = (
            await _off_loop_if_big(len(body), decode_body, body, codings, limit)
            if codings
            else body
        )
    except UnsupportedEncoding as exc:
        raise GatewayError(str(exc), reason="encoding", status=415) from None
    except DecodedTooLarge:
        raise PayloadTooLarge("request body too large", reason="body_size") from None
    except DecodeError as exc:
        raise BadRequest(str(exc), reason="body") from None
    try:
        if spec.multipart:
            return _multipart_names(request, plain, spec)
        try:
            text = plain.decode("utf-8")
        except UnicodeDecodeError:
            raise BodyError("request body is not UTF-8") from None
        obj, pairs = await _off_loop_if_big(len(plain), parse_json_object, text)
        ctx.json = obj
        return json_candidates(pairs, spec.fields)
    except BodyError as exc:
        raise BadRequest(str(exc), reason="body") from None


def _multipart_names(request: web.Request, plain: bytes, spec: BodySpec) -> list[str]:
    # Go's FormValue also reads the query string (and prefers it): refuse that spelling
    # rather than model two parsers' ideas of a query.
    query = request.rel_url.raw_query_string
    if query and "model" in unquote(query).casefold():
        raise BodyError("give the model in the form body, not in the query string")
    names: list[str] = []
    for field in spec.fields:
        names.extend(form_values(request.headers.get("Content-Type", ""), plain, field))
    if not names:
        # Some Ollama versions fall back to a model named "default" when none is given.
        raise BodyError("model is required")
    return names
