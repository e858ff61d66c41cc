"""Secure defaults: configurations the gateway refuses to run, and ones it warns about.

These depend on where the gateway listens, which `serve --listen` can override, so they run
on the *effective* config (after CLI overrides) at start, on every reload, and in `check`.
They are not load-time checks: a file listening on 0.0.0.0 is fine when `--listen` says
127.0.0.1. Problems that do not depend on the address (the HS secret length) are the auth
module's load-time checks and are not repeated here.
"""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.config_load import Problem, is_loopback_host, parse_host_port

CREDENTIAL_KEYS = "auth.users, auth.htpasswd, auth.api_keys or auth.jwt"


def _exposed(address: str | None) -> bool:
    """True when `address` may be reachable from other hosts (unknown names count as such)."""
    if address is None:
        return False
    try:
        host, _port = parse_host_port(address)
    except ValueError:
        return False  # malformed: the loader reports it; nothing is listening there
    return not is_loopback_host(host)


def startup_problems(config: GatewayConfig) -> list[Problem]:
    """Reasons to refuse to start (exit 2) or to refuse a reloaded config."""
    problems: list[Problem] = []
    # An open relay to Ollama on the network: anyone could pull, delete and run models.
    if _exposed(config.listen) and not config.auth.any_credentials:
        problems.append(
            Problem(
                "auth",
                f"no credentials are configured but `listen: {config.listen}` is not a "
                f"loopback address; configure {CREDENTIAL_KEYS}, or listen on 127.0.0.1",
            )
        )
    return problems


def startup_warnings(config: GatewayConfig) -> list[str]:
    """Risky but legitimate setups, logged at start and on reload."""
    warnings: list[str] = []
    # Basic passwords, API keys and tokens would cross the network in clear text.
    if config.tls is None and _exposed(config.listen):
        warnings.append(
            f"serving plain HTTP on {config.listen}, a non-loopback address: credentials "
            "cross the network unencrypted; set `tls: {cert, key}` or terminate TLS in a "
            "proxy in front (see deploy/nginx-tls.conf)"
        )
    metrics = config.metrics
    metrics_address = metrics.listen or config.listen
    # Explicitly public metrics (usage per user and model) on a non-loopback address.
    if metrics.enabled and metrics.public and _exposed(metrics_address):
        warnings.append(
            f"metrics.public is true: {metrics.path} on {metrics_address} needs no "
            "credentials; keep that port away from untrusted networks"
        )
    return warnings
