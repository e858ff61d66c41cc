"""Drain: the requests in flight, so that SIGTERM keeps `shutdown_grace` exactly.

aiohttp's own drain waits up to its timeout for handlers, then cancels them and waits up to
the same timeout again (twice the grace), and never says which requests it cut. The serve
loop instead waits here for the requests in flight up to `shutdown_grace`, then cancels the
ones left, which the access log records with the outcome `shutdown`.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.context import RequestContext

SHUTDOWN_OUTCOME = "shutdown"


class Drain:
    """Requests in flight (their context and the task serving them), for a bounded shutdown."""

    __slots__ = ("_running", "_idle")

    def __init__(self) -> None:
        self._running: dict[int, tuple[RequestContext, asyncio.Task[None]]] = {}
        self._idle: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._running)

    def enter(self, request: web.BaseRequest, ctx: RequestContext) -> None:
        # request.task is the task aiohttp cancels when the client leaves: ending it here
        # unwinds the request the same way (upstream closed, limits released, line logged).
        self._running[id(ctx)] = (ctx, request.task)

    def leave(self, ctx: RequestContext) -> None:
        self._running.pop(id(ctx), None)
        if not self._running and self._idle is not None:
            self._idle.set()

    async def finish(self, grace: float, unwind: float) -> int:
        """Wait up to `grace` seconds for the requests in flight; cancel those still running
        (outcome `shutdown`) and give them up to `unwind` seconds to end. Returns how many
        were cancelled."""
        if await self._wait_idle(grace):
            return 0
        cut = list(self._running.values())
        for ctx, task in cut:
            if not ctx.delivered:  # else only settling up after its last byte: completed
                ctx.outcome = SHUTDOWN_OUTCOME  # read by the observe stage as it unwinds
            task.cancel()
        await self._wait_idle(unwind)
        return len(cut)

    async def _wait_idle(self, seconds: float) -> bool:
        if not self._running:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        finally:
            self._idle = None
        return True
