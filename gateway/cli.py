"""ollama-gateway: serve, check, hash-password, new-key, token."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from gateway.config import DEFAULT_UPSTREAM, GatewayConfig
from gateway.config_load import ConfigError, load_config
from gateway.logging_setup import configure_logging
from gateway.secure_defaults import startup_problems, startup_warnings

DEFAULT_CONFIG = "config/gateway.yaml"
EXIT_CONFIG = 2


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("OLLAMA_GATEWAY_CONFIG") or DEFAULT_CONFIG)


def _load_or_exit(path: Path) -> GatewayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid configuration", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_CONFIG
    # `serve` would refuse these too (judged on the file's own `listen`; --listen may differ).
    problems = startup_problems(config)
    for problem in problems:
        print(problem)
    for warning in startup_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        return EXIT_CONFIG
    print(f"{path}: ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.reload import Overrides
    from gateway.server import run

    path = _config_path(args.config)
    overrides = Overrides(listen=args.listen or None, upstream=args.upstream or None)
    loaded = _load_or_exit(path)
    config = overrides.apply(loaded)  # kept and re-applied on every reload
    # Secure defaults judge the effective config: the address really listened on.
    problems = overrides.problems(loaded) or startup_problems(config)
    if problems:
        print(f"{path}: refusing to start", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.logging)
    for warning in startup_warnings(config):
        logging.getLogger("gateway").warning("%s", warning)
    pidfile = Path(args.pidfile) if args.pidfile else None
    return run(config, path, overrides=overrides, pidfile=pidfile)


def cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP; the gateway logs the outcome (a bad file keeps the old config)."""
    pid = args.pid
    if pid is None:
        try:
            pid = int(Path(args.pidfile).read_text(encoding="ascii").strip())
        except (OSError, ValueError) as exc:
            print(f"cannot read a pid from {args.pidfile}: {exc}", file=sys.stderr)
            return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"cannot signal process {pid}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}; the gateway's log says whether the new config was taken")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", help=f"config file (default: $OLLAMA_GATEWAY_CONFIG, {DEFAULT_CONFIG})"
    )
    serve.add_argument("--listen", help="HOST:PORT, overrides `listen` (kept on reload)")
    serve.add_argument(
        "--upstream", help=f"Ollama URL, overrides `upstream.url` ({DEFAULT_UPSTREAM})"
    )
    serve.add_argument("--pidfile", help="write the process id here (for `ollama-gateway reload`)")
    serve.set_defaults(func=cmd_serve)

    reload = sub.add_parser(
        "reload", help="make a running gateway re-read its config file (sends SIGHUP)"
    )
    target = reload.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="process id of the gateway")
    target.add_argument("--pidfile", help="file written by `serve --pidfile`")
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser("check", help="validate a config file; exit 2 listing every problem")
    check.add_argument("--config", help="config file")
    check.set_defaults(func=cmd_check)

    from gateway.auth.tools import add_auth_commands

    add_auth_commands(sub)  # hash-password, new-key, token
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
