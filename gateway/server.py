"""Running the app: listen, print the address, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.config_load import ConfigError, load_config, parse_host_port
from gateway.keys import STATE
from gateway.state import GatewayState

log = logging.getLogger("gateway")


def tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # modern protocols only
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


def reload_config(app: web.Application, path: Path) -> bool:
    """Validate the file in full, then swap; a bad file keeps the old config."""
    holder = app[STATE]
    try:
        config = load_config(path)
        new_state = GatewayState.build(config, previous=holder.current)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        return False
    holder.swap(new_state)
    log.info("config reloaded (generation %d)", new_state.generation)
    return True


async def serve(config: GatewayConfig, config_path: Path | None) -> int:
    app = create_app(config)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that leaves cancels its handler -> upstream closed
        access_log=None,  # ours is richer and never logs credentials
        shutdown_timeout=config.shutdown_grace,
    )
    await runner.setup()
    host, port = parse_host_port(config.listen)
    scheme = "https" if config.tls else "http"
    site = web.TCPSite(runner, host, port, ssl_context=tls_context(config), backlog=1024)
    await site.start()
    bound = runner.addresses[0]
    shown_host = f"[{bound[0]}]" if ":" in str(bound[0]) else bound[0]
    print(f"ollama-gateway listening on {scheme}://{shown_host}:{bound[1]}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_config, app, config_path)
    try:
        await stop.wait()
        log.info("shutting down: waiting up to %ss for in-flight requests", config.shutdown_grace)
    finally:
        await runner.cleanup()  # stops accepting, then drains in-flight requests
    return 0


def run(config: GatewayConfig, config_path: Path | None) -> int:
    try:
        import uvloop  # optional extra: faster event loop
    except ImportError:
        return asyncio.run(serve(config, config_path))
    if sys.platform == "win32":  # pragma: no cover
        return asyncio.run(serve(config, config_path))
    return uvloop.run(serve(config, config_path))
