"""The HTTP server around the app: what aiohttp answers before the pipeline runs.

aiohttp's parser answers malformed requests itself (an oversized or invalid header, a bad
request line), with a text body that quotes the bytes it failed on: the start of an
`Authorization` header, or a URL with a token in it, echoed to whoever sent it (a shared
proxy's error page, a log). `GatewayRunner` serves the app with a connection handler that
answers those with a fixed JSON error instead. `Expect: 100-continue` is handled by the route
(`defer_continue`, `send_continue`): the 100 goes out only when the gateway reads the body,
after authentication and authorisation passed.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CONTINUE_SENT = web.RequestKey("continue_sent", bool)


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler, minus the echo of unparsable bytes in its 400s."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handling logs the failure (through our logger, which drops raw
        # bytes) and refuses when a response already started; its body is discarded.
        super().handle_error(request, status, exc, "")
        try:
            phrase = HTTPStatus(status).phrase.lower()
        except ValueError:
            phrase = "bad request"
        response = web.Response(
            status=status,
            text=json.dumps({"error": phrase}),
            content_type="application/json",
        )
        response.force_close()
        return response


class _GatewayServer(web.Server):
    """Makes `GatewayRequestHandler`s instead of aiohttp's plain ones."""

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer parser errors without echoing the request."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp builds the Server in Application._make_handler (handler_args, access log
        # class, debug); only the per-connection handler class changes.
        server.__class__ = _GatewayServer
        return server


async def defer_continue(request: web.Request) -> None:
    """The route's `expect_handler`: no `100 Continue` before the pipeline ran.

    aiohttp's default sends it before any middleware, inviting a body the gateway may refuse
    (401/403/413) and telling an anonymous sender the path exists. Clients that wait for the
    100 send the body after a short timeout anyway (curl: 1 s), or get the refusal first.
    Other expectations are ignored (RFC 9110 allows it); `Expect` is never forwarded.
    """
    return None


async def send_continue(request: web.Request) -> None:
    """Send the deferred `100 Continue` once, just before the body is read."""
    if request.get(CONTINUE_SENT) or request.version < (1, 1):
        return
    if request.headers.get("Expect", "").strip().lower() != "100-continue":
        return
    request[CONTINUE_SENT] = True
    writer: Any = request.writer
    await writer.write(CONTINUE)
    writer.output_size = 0  # the 100 is not the response: errors may still be answered
