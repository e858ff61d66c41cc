"""Config checks for limits, registered with the loader (imported by gateway.config_load)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable

from gateway.config import GatewayConfig, LimitsConfig
from gateway.config_load import Problem, register_check


def _check_one(path: str, limits: LimitsConfig | None, *, role: bool) -> Iterable[Problem]:
    if limits is None:
        return
    for name in (
        "requests_per_minute",
        "burst",
        "concurrency",
        "tokens_per_minute",
        "tokens_per_day",
    ):
        value = getattr(limits, name)
        if value is not None and value <= 0:
            yield Problem(f"{path}.{name}", "must be greater than 0 (leave it out for no limit)")
    if role and limits.burst is not None and limits.requests_per_minute is None:
        yield Problem(f"{path}.burst", "needs requests_per_minute")


@register_check
def check_limits(config: GatewayConfig) -> Iterable[Problem]:
    for name, role in config.roles.items():
        yield from _check_one(f"roles.{name}.limits", role.limits, role=True)
    for name, user in config.auth.users.items():
        yield from _check_one(f"auth.users.{name}.limits", user.limits, role=False)
    if config.rate_limits.memory_max_keys < 1:
        yield Problem("rate_limits.memory_max_keys", "must be at least 1")
    if config.rate_limits.store != "memory" and importlib.util.find_spec("redis") is None:
        yield Problem(
            "rate_limits.store",
            "a Redis store needs the redis package: pip install 'ollama-gateway[redis]'",
        )
