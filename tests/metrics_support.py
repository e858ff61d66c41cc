"""Helpers for the metrics and access-log tests: scrape, read samples, await observations."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.context import RequestContext
from gateway.keys import OBSERVERS


class Observed:
    """Records every finished request of an app (after the gateway's own observers ran).

    A streamed response reaches the client before its handler returns, so tests await
    this instead of racing the observer.
    """

    def __init__(self, app: web.Application) -> None:
        self.contexts: list[RequestContext] = []
        self._changed = asyncio.Event()
        app[OBSERVERS].append(self._observe)

    def _observe(self, ctx: RequestContext) -> None:
        self.contexts.append(ctx)
        self._changed.set()

    async def wait(self, count: int) -> list[RequestContext]:
        async with asyncio.timeout(10):
            while len(self.contexts) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.contexts


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for family in self.families for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]

    def names(self) -> set[str]:
        """Every sample name, plus every declared family name (with its `_total` form)."""
        names = {s.name for s in self.samples}
        for family in self.families:
            names.add(family.name)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "info":
                names.add(family.name + "_info")
        return names


async def scrape(
    http: aiohttp.ClientSession, url: str, *, path: str = "/metrics", **kw: Any
) -> Scrape:
    async with http.get(url + path, **kw) as response:
        text = await response.text()
        assert response.status == 200, text
        return Scrape(text)


def pbkdf2_hash(password: str, rounds: int = 1000) -> str:
    """A passlib `pbkdf2_sha256` hash (few rounds: fast tests), without importing passlib."""
    salt = os.urandom(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, rounds, 32)

    def ab64(raw: bytes) -> str:
        return base64.b64encode(raw).decode().rstrip("=").replace("+", ".")

    return f"$pbkdf2-sha256${rounds}${ab64(salt)}${ab64(digest)}"
