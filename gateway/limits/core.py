"""The limit arithmetic, shared by every store (the Redis Lua scripts mirror it line by line).

Each limit keeps one number per principal, a "theoretical arrival time" (TAT):
- `requests_per_minute` is GCRA: every request pushes the TAT one emission interval
  (60/rpm seconds) ahead; a request is admitted while the TAT stays within `burst`
  intervals of now. Smooth: no fixed window, so no 2x at a window boundary.
- `tokens_per_minute` / `tokens_per_day` are token buckets written the same way: the
  bucket holds one period's worth (the limit) and refills continuously at limit/period;
  a request is admitted while some budget remains (TAT - now < period), and the tokens it
  used are charged when it ends (TAT += tokens * period / limit). Sustained use is
  therefore capped at the limit per period.
- `concurrency` counts requests in flight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.config import LimitsConfig
from gateway.limits import Decision, Quota

MINUTE = 60.0
DAY = 86_400.0
# Float slack on the GCRA comparison so that exactly `burst` requests fit at once.
EPSILON = 1e-9
# A concurrency slot frees when some other request ends: unknown, so a polling hint.
CONCURRENCY_RETRY = 1.0
# Order used to break ties when several limits refuse with the same wait.
LIMIT_NAMES = ("requests_per_minute", "concurrency", "tokens_per_minute", "tokens_per_day")


def default_burst(rpm: float) -> int:
    return max(1, int(rpm // 6))


def rpm_params(limits: LimitsConfig) -> tuple[float, float] | None:
    """(emission interval, tolerance) in seconds, or None when the rate is unlimited."""
    rpm = limits.requests_per_minute
    if rpm is None:
        return None
    burst = limits.burst if limits.burst is not None else default_burst(rpm)
    interval = MINUTE / rpm
    return interval, burst * interval


def token_windows(limits: LimitsConfig) -> tuple[tuple[str, int, float], ...]:
    """(name, limit, period) of each configured token budget."""
    out: list[tuple[str, int, float]] = []
    if limits.tokens_per_minute is not None:
        out.append(("tokens_per_minute", limits.tokens_per_minute, MINUTE))
    if limits.tokens_per_day is not None:
        out.append(("tokens_per_day", limits.tokens_per_day, DAY))
    return tuple(out)


def is_unlimited(limits: LimitsConfig) -> bool:
    return (
        limits.requests_per_minute is None
        and limits.concurrency is None
        and limits.tokens_per_minute is None
        and limits.tokens_per_day is None
    )


@dataclass(slots=True)
class State:
    """One principal's counters: the three TATs (0: never used) and requests in flight."""

    rpm_tat: float = 0.0
    tpm_tat: float = 0.0
    tpd_tat: float = 0.0
    inflight: int = 0

    def tat(self, name: str) -> float:
        return self.tpm_tat if name == "tokens_per_minute" else self.tpd_tat

    def horizon(self) -> float:
        """When every counter is back to idle (the entry may then be forgotten)."""
        return max(self.rpm_tat, self.tpm_tat, self.tpd_tat)


def evaluate(limits: LimitsConfig, state: State, now: float) -> tuple[Decision, float]:
    """Decide one admission from the state before it. -> (decision, the new rpm TAT).

    Pure: the caller commits the new TAT and the concurrency slot only when admitted.
    """
    refusals: list[tuple[str, float]] = []
    new_rpm_tat = state.rpm_tat
    gcra = rpm_params(limits)
    if gcra is not None:
        interval, tolerance = gcra
        new_rpm_tat = max(state.rpm_tat, now) + interval
        if new_rpm_tat - now > tolerance + EPSILON:
            refusals.append(("requests_per_minute", new_rpm_tat - now - tolerance))
    if limits.concurrency is not None and state.inflight >= limits.concurrency:
        refusals.append(("concurrency", CONCURRENCY_RETRY))
    for name, _limit, period in token_windows(limits):
        tat = state.tat(name)
        if tat - now >= period:  # no budget left: wait until some has refilled
            refusals.append((name, tat - now - period))
    if refusals:
        name, wait = refusals[0]
        for other, other_wait in refusals[1:]:
            if other_wait > wait:  # the binding limit is the one that frees last
                name, wait = other, other_wait
        quota = _quota(limits, state, now, state.rpm_tat)
        return Decision(allowed=False, limit=name, retry_after=wait, quota=quota), state.rpm_tat
    return Decision(allowed=True, quota=_quota(limits, state, now, new_rpm_tat)), new_rpm_tat


def charge(limits: LimitsConfig, state: State, now: float, tokens: int) -> None:
    """Charge the tokens a finished request used to every configured budget."""
    if tokens <= 0:
        return
    if limits.tokens_per_minute is not None:
        state.tpm_tat = max(state.tpm_tat, now) + tokens * MINUTE / limits.tokens_per_minute
    if limits.tokens_per_day is not None:
        state.tpd_tat = max(state.tpd_tat, now) + tokens * DAY / limits.tokens_per_day


def _quota(limits: LimitsConfig, state: State, now: float, rpm_tat: float) -> Quota | None:
    """The quota with the smallest fraction left (the draft RateLimit headers' rule)."""
    best: Quota | None = None
    best_fraction = 2.0
    gcra = rpm_params(limits)
    if gcra is not None and limits.requests_per_minute is not None:
        interval, tolerance = gcra
        burst = round(tolerance / interval)
        used = max(rpm_tat - now, 0.0)
        remaining = max(0, min(burst, math.floor((tolerance - used) / interval + EPSILON)))
        best = Quota(round(limits.requests_per_minute), remaining, used)
        best_fraction = remaining / burst
    for name, limit, period in token_windows(limits):
        debt = max(state.tat(name) - now, 0.0)
        remaining = max(0, math.floor(limit - debt * limit / period))
        fraction = remaining / limit
        if fraction < best_fraction:
            best, best_fraction = Quota(limit, remaining, debt), fraction
    return best


def rate_headers(quota: Quota) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(quota.limit),
        "RateLimit-Remaining": str(quota.remaining),
        "RateLimit-Reset": str(math.ceil(quota.reset)),
    }


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up (an early retry would only be refused again), at least 1."""
    return str(max(1, math.ceil(seconds - EPSILON)))
