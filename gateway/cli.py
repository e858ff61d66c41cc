"""ollama-gateway: serve, check, hash-password, new-key, token."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from gateway.config import GatewayConfig, UpstreamConfig
from gateway.config_load import ConfigError, load_config

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
        load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_CONFIG
    print(f"{path}: ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import run

    path = _config_path(args.config)
    config = _load_or_exit(path)
    if args.listen:
        config = dataclasses.replace(config, listen=args.listen)
    if args.upstream:
        config = dataclasses.replace(
            config, upstream=dataclasses.replace(config.upstream, url=args.upstream)
        )
    _setup_logging(config)
    return run(config, path)


def _setup_logging(config: GatewayConfig) -> None:
    logging.basicConfig(
        level=config.logging.level.upper(), stream=sys.stderr, format="%(levelname)s %(message)s"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama-gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help=f"config file (default: $OLLAMA_GATEWAY_CONFIG, {DEFAULT_CONFIG})")
    serve.add_argument("--listen", help="HOST:PORT, overrides `listen`")
    serve.add_argument("--upstream", help=f"Ollama URL, overrides `upstream.url` ({UpstreamConfig.url})")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate a config file; exit 2 listing every problem")
    check.add_argument("--config", help="config file")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
