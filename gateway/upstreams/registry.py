"""Several Ollama servers: what each one has, whether it is up, and which can serve a model.

Envoy's split, small: a *cluster* of named servers, each with a catalogue (installed models from
`/api/tags`, loaded ones from `/api/ps`) learnt in the background on its own schedule, never per
client request (Open WebUI alone lists models every second), and a health state: a server that
refuses or drops a connection is marked down and probed with `GET /api/version` until it
answers, then its catalogue is refreshed. Pure bookkeeping plus the background loop; the HTTP
of client requests lives in `gateway.upstreams.stage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gateway.config import GatewayConfig, UpstreamConfig
from gateway.policy.models import compile_glob, normalise_model

log = logging.getLogger("gateway.upstreams")

PROBE_TIMEOUT = 5.0
LOADING_SECONDS = 60.0  # a model just routed to a server counts as loaded there this long
COOLDOWN_SECONDS = 5.0  # after an instant 503 (Ollama's queue full)
MAX_CATALOGUE = 10_000  # models per server kept at most
MAX_STICKY = 10_000  # (user, model) pairs remembered

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Timings:
    """How often the background loop asks each server (seconds)."""

    tags_every: float = 30.0  # installed models change rarely (pulls via the gateway: at once)
    ps_every: float = 5.0  # loaded models change with every cold load and keep_alive expiry
    probe_every: float = 3.0  # a server marked down is probed this often
    # An unknown model refreshes the catalogues before its 404, at most this often per
    # server: made-up model names must not turn into a flood of listings upstream.
    refresh_at_most_every: float = 1.0


@dataclass(eq=False)
class Server:
    """One Ollama server as the gateway sees it."""

    name: str
    config: UpstreamConfig
    allowed: tuple[Any, ...] = ()  # compiled `models` globs; empty: every model it lists
    up: bool = True  # optimistic until a connection fails (the catalogue then says more)
    cooldown_until: float = 0.0
    installed: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> tags entry
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ps entry
    loading: dict[str, float] = field(default_factory=dict)  # name -> until (just routed)
    version: str | None = None
    catalogue_at: float | None = None  # when /api/tags last answered
    reason: str = ""  # why it is down

    def allows(self, model: str) -> bool:
        return not self.allowed or any(p.fullmatch(model) for p in self.allowed)

    def has(self, model: str) -> bool:
        return model in self.installed and self.allows(model)

    def is_loaded(self, model: str, now: float) -> bool:
        return model in self.loaded or self.loading.get(model, 0.0) > now

    def available(self, now: float) -> bool:
        return self.up and self.cooldown_until <= now

    def state(self, now: float) -> str:
        if not self.up:
            return "down"
        return "cooldown" if self.cooldown_until > now else "up"


class Sticky:
    """The server each (user, model) last ran on: Ollama keeps prompt caches per server."""

    def __init__(self) -> None:
        self._last: OrderedDict[tuple[str, str], str] = OrderedDict()

    def get(self, user: str, model: str) -> str | None:
        return self._last.get((user, model))

    def set(self, user: str, model: str, server: str) -> None:
        self._last[(user, model)] = server
        self._last.move_to_end((user, model))
        if len(self._last) > MAX_STICKY:
            self._last.popitem(last=False)


def _compile_models(globs: Iterable[str] | None) -> tuple[Any, ...]:
    return tuple(compile_glob(g) for g in globs or ())


class Cluster:
    """Every configured server, kept across reloads (catalogues and health survive)."""

    def __init__(
        self, config: GatewayConfig, *, clock: Clock = time.monotonic, timings: Timings = Timings()
    ) -> None:
        self._clock = clock
        self.timings = timings
        self.servers: dict[str, Server] = {}
        self._changed = asyncio.Event()
        self.sticky = Sticky()
        self._refreshing: dict[str, asyncio.Future[bool]] = {}
        self.reconfigure(config)

    def now(self) -> float:
        return self._clock()

    @property
    def several(self) -> bool:
        """More than one server: routing, merged listings and management targets apply."""
        return len(self.servers) > 1

    def names(self) -> list[str]:
        return list(self.servers)

    def reconfigure(self, config: GatewayConfig) -> None:
        servers: dict[str, Server] = {}
        for name, upstream in config.servers:
            server = self.servers.get(name)
            if server is None or server.config.url != upstream.url:
                server = Server(name, upstream)  # a new address: learn it afresh
            server.config = upstream
            server.allowed = _compile_models(getattr(upstream, "models", None))
            servers[name] = server
        self.servers = servers
        self._changed.set()

    # --- routing reads --------------------------------------------------------------------

    def candidates(self, model: str) -> list[Server]:
        """Servers that are up (not cooling down), list `model` and may serve it."""
        now = self._clock()
        return [s for s in self.servers.values() if s.available(now) and s.has(model)]

    def anywhere(self, model: str) -> list[Server]:
        """Every server that lists `model`, up or not."""
        return [s for s in self.servers.values() if s.has(model)]

    def first_up(self) -> Server:
        now = self._clock()
        for server in self.servers.values():
            if server.available(now):
                return server
        return next(iter(self.servers.values()))

    def mark_loading(self, server: Server, model: str) -> None:
        """Routed there: count it as loaded so a burst does not cold-load it on every box."""
        server.loading[model] = self._clock() + LOADING_SECONDS

    # --- health ---------------------------------------------------------------------------

    def mark_down(self, server: Server, reason: str) -> None:
        if server.up:
            log.warning("upstream %s marked down: %s", server.name, reason)
        server.up, server.reason = False, reason
        self._changed.set()  # the loop probes it

    def cool_down(self, server: Server, seconds: float = COOLDOWN_SECONDS) -> None:
        log.warning("upstream %s answered 503 at once: cooling down %.0f s", server.name, seconds)
        server.cooldown_until = self._clock() + seconds

    def _mark_up(self, server: Server) -> None:
        if not server.up:
            log.warning("upstream %s is up again", server.name)
        server.up, server.reason = True, ""

    # --- the background loop --------------------------------------------------------------

    def refresh_soon(self, server: Server) -> None:
        """After a management call or a 'model not found': relearn its catalogue now."""
        server.catalogue_at = None
        self._changed.set()

    async def refresh_for_unknown_model(self, session: aiohttp.ClientSession) -> None:
        """Before answering "model not found": relearn the catalogues of the servers that are
        up, unless learnt very recently; concurrent callers share one refresh per server."""
        now = self._clock()
        waits: list[asyncio.Future[bool]] = []
        for server in self.servers.values():
            if not server.up:
                continue
            running = self._refreshing.get(server.name)
            if running is None:
                learnt = server.catalogue_at
                if learnt is not None and now - learnt < self.timings.refresh_at_most_every:
                    continue
                running = asyncio.ensure_future(self.refresh(session, server))
                self._refreshing[server.name] = running
                running.add_done_callback(functools.partial(self._refreshed, server.name))
            waits.append(running)
        if waits:
            await asyncio.gather(*(asyncio.shield(w) for w in waits))

    def _refreshed(self, name: str, _done: asyncio.Future[bool]) -> None:
        self._refreshing.pop(name, None)

    async def refresh(self, session: aiohttp.ClientSession, server: Server) -> bool:
        """Learn `server`'s installed and loaded models now; False when it did not answer."""
        try:
            tags = await _get_json(session, server, "/api/tags")
            ps = await _get_json(session, server, "/api/ps")
            version = await _get_json(session, server, "/api/version")
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self.mark_down(server, f"{type(exc).__name__}: {exc}"[:200])
            return False
        server.installed = _entries(tags)
        server.loaded = _entries(ps)
        now = self._clock()
        server.loading = {m: t for m, t in server.loading.items() if t > now}
        if isinstance(version, dict) and isinstance(version.get("version"), str):
            server.version = version["version"]
        server.catalogue_at = now
        self._mark_up(server)
        return True

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Forever: catalogues every `tags_every`, loaded models every `ps_every`, down
        servers probed every `probe_every`; woken early by `refresh_soon` and `mark_down`."""
        timings = self.timings
        last_ps: dict[str, float] = {}
        while True:
            self._changed.clear()
            if not self.several:  # one server: nothing to route, nothing to learn
                await self._changed.wait()
                continue
            now = self._clock()
            due: list[Server] = []
            for server in list(self.servers.values()):
                stale = (
                    server.catalogue_at is None or now - server.catalogue_at >= timings.tags_every
                )
                ps_due = now - last_ps.get(server.name, -1e9) >= timings.ps_every
                if not server.up or stale or ps_due:
                    due.append(server)
                    last_ps[server.name] = now
            if due:
                await asyncio.gather(*(self._poll(session, s) for s in due))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timings.ps_every, timings.probe_every)):
                    await self._changed.wait()

    async def _poll(self, session: aiohttp.ClientSession, server: Server) -> None:
        now = self._clock()
        stale = server.catalogue_at is None or now - server.catalogue_at >= self.timings.tags_every
        if not server.up or stale:
            await self.refresh(session, server)
            return
        try:
            server.loaded = _entries(await _get_json(session, server, "/api/ps"))
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self.mark_down(server, f"{type(exc).__name__}: {exc}"[:200])


async def _get_json(session: aiohttp.ClientSession, server: Server, path: str) -> Any:
    url = server.config.url.rstrip("/") + path
    async with asyncio.timeout(min(PROBE_TIMEOUT, server.config.read_timeout)):
        async with session.get(url) as response:
            if response.status != 200:
                raise ValueError(f"{path} answered {response.status}")
            return await response.json(content_type=None)


def _entries(document: Any) -> dict[str, dict[str, Any]]:
    """`{"models": [...]}` -> normalised name -> entry (Ollama's bytes are kept per field)."""
    models = document.get("models") if isinstance(document, dict) else None
    out: dict[str, dict[str, Any]] = {}
    for entry in models or ():
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            out[normalise_model(entry["name"])] = entry
            if len(out) >= MAX_CATALOGUE:
                break
    return out
