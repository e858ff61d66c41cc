"""Running the app: listen, print the address, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig, TLSConfig
from gateway.config_load import parse_host_port
from gateway.drain import Drain
from gateway.http_server import GatewayRunner
from gateway.keys import DRAIN, STATE
from gateway.logging_setup import configure_logging
from gateway.metrics_http import start_metrics_listener
from gateway.reload import Overrides, Reloader, TLSRotation
from gateway.scheduler.policy import slots_in_effect

log = logging.getLogger("gateway")

# After shutdown_grace, the requests cut then get this long to unwind (close their upstream
# connection, log their line); the process exits within shutdown_grace + about twice this.
UNWIND_SECONDS = 2.0

__all__ = [
    "Overrides",
    "Reloader",
    "reload_config",
    "run",
    "serve",
    "server_tls_context",
    "tls_context",
]


def server_tls_context(tls: TLSConfig) -> ssl.SSLContext:
    """A server context for `tls`; raises OSError/ssl.SSLError when the files are unusable."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # Modern protocols only: TLS 1.0/1.1 (downgrade attacks, SHA-1 MACs) are refused.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(tls.cert, tls.key)
    return context


def tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The context to serve `config.tls` with (None: plain HTTP). No rotation on reload."""
    return server_tls_context(config.tls) if config.tls is not None else None


async def reload_config(
    app: web.Application, path: Path, *, overrides: Overrides | None = None
) -> bool:
    """One reload of a running app from `path` (what SIGHUP does; for embedding and tests)."""
    running = app[STATE].current.config
    reloader = Reloader(app, path, overrides=overrides or Overrides(), running=running)
    return await reloader.reload()


def _shown(address: tuple[str, int] | object) -> tuple[str, object]:
    host, port = address[:2]  # type: ignore[index]
    return (f"[{host}]" if ":" in str(host) else str(host)), port


class _Pidfile:
    """Our pid for `ollama-gateway reload --pidfile` (and service managers); removed at exit."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self) -> None:
        if self.path is not None:
            self.path.write_text(f"{os.getpid()}\n", encoding="ascii")

    def remove(self) -> None:
        if self.path is None:
            return
        try:
            if self.path.read_text(encoding="ascii").strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


async def serve(
    config: GatewayConfig,
    config_path: Path | None,
    *,
    overrides: Overrides | None = None,
    pidfile: Path | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; `config` already carries the CLI overrides."""
    app = create_app(config)
    drain = app[DRAIN] = Drain()
    runner = GatewayRunner(
        app,
        handler_cancellation=True,  # a client that leaves cancels its handler -> upstream closed
        access_log=None,  # ours is richer and never logs credentials
        # `Drain` has bounded the wait by shutdown_grace before aiohttp's cleanup runs; this
        # only covers what it does not track (a request still being read).
        shutdown_timeout=UNWIND_SECONDS,
    )
    await runner.setup()
    tls = TLSRotation(server_tls_context, config.tls) if config.tls is not None else None
    ssl_context = tls.listener if tls else None
    scheme = "https" if tls else "http"
    reloader = Reloader(
        app,
        config_path,
        overrides=overrides or Overrides(),
        running=config,
        tls=tls,
        on_logging_change=configure_logging,
    )
    # Handlers go in before the address is printed: a signal sent as soon as a supervisor
    # (or test) reads that line must never meet the default action (death).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = [signal.SIGTERM, signal.SIGINT]
    for signum in handled:
        loop.add_signal_handler(signum, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reloader.schedule)
        handled.append(signal.SIGHUP)
    files = _Pidfile(pidfile)
    metrics_runner: web.AppRunner | None = None
    try:
        listening = config.listen
        try:
            host, port = parse_host_port(config.listen)
            await web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=1024).start()
            if config.metrics.enabled and config.metrics.listen:  # metrics on their own address
                listening = config.metrics.listen
                metrics_runner = await start_metrics_listener(
                    app, config.metrics.listen, ssl_context
                )
        except OSError as exc:
            print(
                f"ollama-gateway: cannot listen on {listening}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        if metrics_runner is not None:
            metrics_host, metrics_port = _shown(metrics_runner.addresses[0])
            log.info(
                "metrics on %s://%s:%s%s", scheme, metrics_host, metrics_port, config.metrics.path
            )
        shown_host, shown_port = _shown(runner.addresses[0])
        files.write()
        # Everything built so far lives as long as the process: keep it out of the
        # collector's generations, so full collections stay short (p99 latency).
        gc.freeze()
        log.info("%s", slots_in_effect(config))
        print(f"ollama-gateway listening on {scheme}://{shown_host}:{shown_port}", flush=True)

        await stop.wait()
        if config_path is not None:
            loop.remove_signal_handler(signal.SIGHUP)
            handled.remove(signal.SIGHUP)
        await reloader.wait_idle()
        # Close the listening sockets first: new connections are refused from here on.
        for running_site in list(runner.sites):
            await running_site.stop()
        # Idle keep-alive connections close now; busy ones once their response is sent.
        if runner.server is not None:
            runner.server.pre_shutdown()
        grace = config.shutdown_grace  # restart-only: a reload keeps it
        log.info(
            "shutting down: no longer accepting connections; %d request(s) in flight have up "
            "to %ss (shutdown_grace) to finish",
            len(drain),
            grace,
        )
        ended = await drain.finish(grace, UNWIND_SECONDS)
        if ended:
            log.warning(
                "shutdown_grace of %ss is over: ending %d request(s) still running "
                "(logged with outcome `shutdown`)",
                grace,
                ended,
            )
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        await runner.cleanup()
        files.remove()
        for signum in handled:
            loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


def run(
    config: GatewayConfig,
    config_path: Path | None,
    *,
    overrides: Overrides | None = None,
    pidfile: Path | None = None,
) -> int:
    main = serve(config, config_path, overrides=overrides, pidfile=pidfile)
    if os.environ.get("OLLAMA_GATEWAY_LOOP", "uvloop") == "asyncio":
        return asyncio.run(main)  # fairer than uvloop under overload (README, "Speed")
    try:
        import uvloop  # optional extra: faster event loop
    except ImportError:
        return asyncio.run(main)
    if sys.platform == "win32":  # pragma: no cover
        return asyncio.run(main)
    return uvloop.run(main)
