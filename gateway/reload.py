"""Hot reload: re-read the config file, validate it in full, swap the state atomically.

A reload never half-applies. The new file is loaded, the CLI overrides re-applied, settings
that only a restart can change are pinned to their running values (with a warning), the
secure-defaults checks run, the new certificate is loaded, and the whole new GatewayState is
built -- all before anything changes. Then one assignment swaps it in. Requests in flight
hold the old state to their end. Any problem keeps the old config, logs every reason and
counts a failed reload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config import GatewayConfig, LoggingConfig, TLSConfig
from gateway.config_load import ConfigError, Problem, load_config, parse_host_port
from gateway.keys import METRICS, STATE
from gateway.secure_defaults import startup_problems, startup_warnings
from gateway.state import GatewayState

log = logging.getLogger("gateway")

URL_PATTERN = re.compile(r"https?://[^/\s?#]+(/[^\s?#]*)?")


@dataclass(frozen=True, slots=True)
class Overrides:
    """`serve --listen/--upstream`: applied at start and again on every reload."""

    listen: str | None = None
    upstream: str | None = None

    def problems(self, config: GatewayConfig | None = None) -> list[Problem]:
        problems = []
        if self.upstream is not None and config is not None and config.upstreams:
            # Which of the servers would it replace? Silently ignoring it would mislead.
            problems.append(
                Problem("--upstream", "cannot be used when the config lists `upstreams`")
            )
        if self.listen is not None:
            try:
                parse_host_port(self.listen)
            except ValueError as exc:
                problems.append(Problem("--listen", str(exc)))
        if self.upstream is not None and not URL_PATTERN.fullmatch(self.upstream):
            problems.append(Problem("--upstream", "must be an http:// or https:// URL"))
        return problems

    def apply(self, config: GatewayConfig) -> GatewayConfig:
        if self.listen is not None:
            config = dataclasses.replace(config, listen=self.listen)
        if self.upstream is not None:
            upstream = dataclasses.replace(config.upstream, url=self.upstream)
            config = dataclasses.replace(config, upstream=upstream)
        return config


# Settings fixed when the listeners and the app are built: a reload keeps their running
# values (and says so); everything else -- users, keys, roles, routes, limits, upstream URL
# and timeouts, CORS, logging, trusted proxies -- changes without a restart.
RESTART_ONLY = (
    "listen",
    "tls",  # on/off only: a new certificate (or new files) is loaded on reload
    "shutdown_grace",
    "max_body_bytes",
    "client_idle_timeout",  # handed to aiohttp's connection handlers when the app is built
    "upstream.max_connections",
    "rate_limits.store",  # counters live in the store the app started with
    "rate_limits.memory_max_keys",
    "metrics.enabled",
    "metrics.path",
    "metrics.listen",
    "metrics.user_label",
)


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _set(config: Any, key: str, value: Any) -> Any:
    head, _, rest = key.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _set(getattr(config, head), rest, value)})


# The password in a URL's user info (`redis://:PASSWORD@host`), kept out of the log.
_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*@")


def _masked(value: object) -> object:
    return _URL_PASSWORD.sub(r"\1***@", value) if isinstance(value, str) else value


def pin_restart_only(new: GatewayConfig, running: GatewayConfig) -> tuple[GatewayConfig, list[str]]:
    """Keep the running value of settings a reload cannot change; say which ones changed.

    Pinning (rather than carrying the new values in the state) keeps the state truthful:
    the secure-defaults checks then judge the address really listened on.
    """
    notes: list[str] = []
    for key in RESTART_ONLY:
        wanted, kept = _get(new, key), _get(running, key)
        if key == "tls":
            wanted, kept = wanted is not None, kept is not None
            if wanted == kept:
                continue
            new = dataclasses.replace(new, tls=running.tls)
        elif wanted != kept:
            new = _set(new, key, kept)
        else:
            continue
        notes.append(
            f"{key} changed to {_masked(wanted)!r}: restart to apply (still {_masked(kept)!r})"
        )
    return new, notes


class TLSRotation:
    """The listener's SSL context, switching each new handshake to the newest certificate.

    The listening socket keeps one SSLContext for its life; its SNI callback (run by OpenSSL
    on every ClientHello, with or without SNI) moves the handshake onto the context built at
    the last reload. Replacing one reference is atomic: no handshake ever sees a new
    certificate paired with an old key.
    """

    def __init__(self, build: Callable[[TLSConfig], ssl.SSLContext], tls: TLSConfig) -> None:
        self._build = build
        self.listener = build(tls)
        self.current = self.listener
        self.listener.sni_callback = self._select

    def _select(self, sslobj: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.current
        if current is not context:
            sslobj.context = current

    def prepare(self, tls: TLSConfig) -> ssl.SSLContext:
        """Build (and so validate) a context for `tls`; raises OSError/ssl.SSLError."""
        return self._build(tls)

    def commit(self, context: ssl.SSLContext) -> None:
        self.current = context


class Reloader:
    """Serialised reloads of one app; `schedule` is the SIGHUP handler."""

    def __init__(
        self,
        app: web.Application,
        path: Path | None,
        *,
        overrides: Overrides,
        running: GatewayConfig,
        tls: TLSRotation | None = None,
        on_logging_change: Callable[[LoggingConfig], None] | None = None,
    ) -> None:
        self.app = app
        self.path = path
        self.overrides = overrides
        self.running = running
        self.tls = tls
        self.on_logging_change = on_logging_change
        self._lock = asyncio.Lock()  # two quick SIGHUPs: the second reload starts after the first
        self._tasks: set[asyncio.Task[bool]] = set()

    def schedule(self) -> None:
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self) -> bool:
        async with self._lock:
            try:
                ok = await self._reload()
            except Exception:  # never let a reload take the server down: keep the old config
                log.exception("reload refused: unexpected error; the previous config stays")
                ok = False
        self._count(ok)
        return ok

    def _count(self, ok: bool) -> None:
        metrics = self.app.get(METRICS)
        if metrics is not None:
            metrics.config_reloads.labels(result="success" if ok else "failure").inc()

    def _refuse(self, problems: list[Problem]) -> bool:
        for problem in problems:
            log.error("reload refused: %s", problem)
        log.error(
            "reload of %s failed (%d problem(s)); still serving generation %d",
            self.path,
            len(problems),
            self.app[STATE].current.generation,
        )
        return False

    async def _reload(self) -> bool:
        if self.path is None:
            return self._refuse([Problem("", "no config file to reload")])
        log.info("reloading %s", self.path)
        try:
            # File and YAML work off the event loop: streams keep flowing meanwhile.
            config = await asyncio.to_thread(load_config, self.path)
        except ConfigError as exc:
            return self._refuse(exc.problems)
        problems = self.overrides.problems(config)
        config = self.overrides.apply(config)
        config, notes = pin_restart_only(config, self.running)
        # Judged on the effective config: the address really listened on, after overrides.
        problems = problems or startup_problems(config)
        if problems:
            return self._refuse(problems)
        new_tls = None
        if self.tls is not None and config.tls is not None:
            try:  # renewed certificate files are picked up on every reload
                new_tls = await asyncio.to_thread(self.tls.prepare, config.tls)
            except (OSError, ssl.SSLError) as exc:
                return self._refuse([Problem("tls", f"cannot load the certificate: {exc}")])
        holder = self.app[STATE]
        try:
            state = GatewayState.build(config, previous=holder.current)
        except ConfigError as exc:
            return self._refuse(exc.problems)
        # Everything is built: commit. From here nothing can fail half-way.
        if new_tls is not None and self.tls is not None:
            self.tls.commit(new_tls)
        old = holder.swap(state)
        if self.on_logging_change is not None and config.logging != old.config.logging:
            self.on_logging_change(config.logging)
        for note in notes:
            log.warning("%s", note)
        for warning in startup_warnings(config):
            log.warning("%s", warning)
        log.info("config reloaded from %s (generation %d)", self.path, state.generation)
        return True
