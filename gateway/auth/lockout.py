"""Brute-force protection: addresses that keep failing are slowed, then refused (429).

Keyed by client address (already resolved through `trusted_proxies`, so it is not
spoofable) and, for IPv6, by /64: one host usually owns a whole /64. Memory is bounded by
`max_tracked`. A success does not wipe the count: otherwise one valid account would let
an attacker reset the counter between guesses at another.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Final

from gateway.config import LockoutConfig

log = logging.getLogger("gateway.auth")

DELAY_BASE: Final = 0.1  # seconds added to the first slowed failure, doubling after
DELAY_MAX: Final = 2.0


class _Record:
    __slots__ = ("window_start", "failures", "blocked_until")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.failures = 0
        self.blocked_until = 0.0


@lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class Lockout:
    __slots__ = ("_config", "_clock", "_records")

    def __init__(
        self,
        config: LockoutConfig,
        *,
        clock: Callable[[], float],
        records: OrderedDict[str, _Record] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        # Carried over on reload: a config reload must not unblock an attacker.
        self._records: OrderedDict[str, _Record] = records if records is not None else OrderedDict()

    def handover(self, config: LockoutConfig, clock: Callable[[], float]) -> Lockout:
        return Lockout(config, clock=clock, records=self._records)

    def retry_after(self, address: str) -> int | None:
        """Seconds the address stays blocked, or None when it may try."""
        if not self._records:
            return None
        record = self._records.get(address_key(address))
        if record is None:
            return None
        remaining = record.blocked_until - self._clock()
        return math.ceil(remaining) if remaining > 0 else None

    def failure(self, address: str) -> float:
        """Count a failure; return how long to delay the 401 (seconds)."""
        config = self._config
        if config.max_failures <= 0:
            return 0.0
        now = self._clock()
        key = address_key(address)
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record(now)
            while len(self._records) > config.max_tracked:
                self._records.popitem(last=False)
        else:
            self._records.move_to_end(key)
        if now - record.window_start > config.window:
            record.window_start, record.failures = now, 0
        record.failures += 1
        if record.failures >= config.max_failures:
            record.blocked_until = now + config.block_seconds
            record.window_start, record.failures = now, 0
            log.warning(
                "auth: %s blocked for %gs after %d failed attempts",
                key,
                config.block_seconds,
                config.max_failures,
            )
            return 0.0
        slow_after = config.max_failures // 2
        if record.failures <= slow_after:
            return 0.0
        return min(DELAY_MAX, DELAY_BASE * 2.0 ** (record.failures - slow_after - 1))

    def __len__(self) -> int:
        return len(self._records)
