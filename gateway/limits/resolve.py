"""Effective limits of a principal.

Per limit: the most generous value among the principal's roles (a role without that
limit means unlimited, which wins); then every value the user's own entry sets
overrides. Pure: no I/O, no clock.
"""

from __future__ import annotations

from gateway.auth.principal import Principal
from gateway.config import GatewayConfig, LimitsConfig
from gateway.limits.core import default_burst

UNLIMITED = LimitsConfig()
_QUOTAS = ("concurrency", "tokens_per_minute", "tokens_per_day")


def _most_generous(values: list[int | float | None]) -> int | float | None:
    if not values or any(v is None for v in values):
        return None  # some role is unlimited here
    return max(v for v in values if v is not None)


def limits_for(principal: Principal, config: GatewayConfig) -> LimitsConfig:
    """The limits this principal is held to (burst resolved whenever a rate is set)."""
    roles = [config.roles[r] for r in sorted(principal.roles) if r in config.roles]
    role_limits = [role.limits or UNLIMITED for role in roles]
    rpm = _most_generous([lim.requests_per_minute for lim in role_limits])
    burst: int | None = None
    if rpm is not None:  # every role limits the rate: take the largest burst among them
        burst = max(
            lim.burst if lim.burst is not None else default_burst(lim.requests_per_minute or rpm)
            for lim in role_limits
        )
    merged: dict[str, int | float | None] = {
        name: _most_generous([getattr(lim, name) for lim in role_limits]) for name in _QUOTAS
    }
    user = config.auth.users.get(principal.user)
    own = user.limits if user is not None else None
    if own is not None:
        if own.requests_per_minute is not None:
            rpm = own.requests_per_minute
            burst = None  # the burst belongs to the rate: the user's, or its default
        if own.burst is not None:
            burst = own.burst
        for name in _QUOTAS:
            value = getattr(own, name)
            if value is not None:
                merged[name] = value
    if rpm is not None and burst is None:
        burst = default_burst(rpm)
    return LimitsConfig(
        requests_per_minute=rpm,
        burst=burst,
        concurrency=_int(merged["concurrency"]),
        tokens_per_minute=_int(merged["tokens_per_minute"]),
        tokens_per_day=_int(merged["tokens_per_day"]),
    )


def _int(value: int | float | None) -> int | None:
    return None if value is None else int(value)
