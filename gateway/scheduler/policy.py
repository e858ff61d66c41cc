"""What the config says about scheduling: slots per model, caps, each principal's share.

Built once per config (part of `GatewayState`), read by the scheduler at each dispatch, so
a reload's new slots, weights and priorities apply to the next dispatches. Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.config import GatewayConfig, UpstreamConfig
from gateway.policy.models import is_cloud, normalise_glob
from gateway.scheduler.core import SlotKey

DEFAULT_UPSTREAM = "default"  # the name of the one server of `upstream:`


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(
        ".*".join(re.escape(piece) for piece in normalise_glob(pattern).split("*")), re.DOTALL
    )


@dataclass(frozen=True, slots=True)
class SlotTable:
    """Slots of one upstream: per model glob (first match), else the default."""

    default: int
    overrides: tuple[tuple[re.Pattern[str], int], ...]

    @classmethod
    def from_upstream(cls, upstream: UpstreamConfig) -> SlotTable:
        return cls(
            default=upstream.slots,
            overrides=tuple((_glob(g), n) for g, n in upstream.model_slots.items()),
        )

    def slots_for(self, model: str) -> int:
        if is_cloud(model):
            return 0  # runs on ollama.com, not on this server's GPU: nothing to share
        for pattern, slots in self.overrides:
            if pattern.fullmatch(model):
                return slots
        return self.default


@dataclass(frozen=True, slots=True)
class GatewaySchedulingPolicy:
    """The scheduler's view of one config (the `SchedulingPolicy` protocol)."""

    tables: dict[str, SlotTable]
    max_queue_per_user: int
    max_queue: int
    queue_timeout: float
    _config: GatewayConfig = field(repr=False)
    _cache: dict[SlotKey, int] = field(default_factory=dict, repr=False)
    _shares: dict[tuple[str, frozenset[str]], tuple[float, int]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def from_config(cls, config: GatewayConfig) -> GatewaySchedulingPolicy:
        scheduler = config.scheduler
        return cls(
            tables={DEFAULT_UPSTREAM: SlotTable.from_upstream(config.upstream)},
            max_queue_per_user=scheduler.max_queue_per_user,
            max_queue=scheduler.max_queue,
            queue_timeout=scheduler.queue_timeout,
            _config=config,
        )

    def slots_for(self, key: SlotKey) -> int:
        slots = self._cache.get(key)
        if slots is None:
            table = self.tables.get(key[0])
            slots = table.slots_for(key[1]) if table is not None else 0
            if len(self._cache) < 10_000:  # model names are caller input: bounded
                self._cache[key] = slots
        return slots

    def share_of(self, user: str, roles: frozenset[str]) -> tuple[float, int]:
        """(weight, priority): the highest among the user's roles, then its own entry's."""
        cached = self._shares.get((user, roles))
        if cached is not None:
            return cached
        config = self._config
        declared = [config.roles[r] for r in roles if r in config.roles]
        weight = max((r.weight for r in declared), default=1.0)
        priority = max((r.priority for r in declared), default=0)
        entry = config.auth.users.get(user)
        if entry is not None:
            weight = entry.weight if entry.weight is not None else weight
            priority = entry.priority if entry.priority is not None else priority
        share = (weight, priority)
        if len(self._shares) < 10_000:  # JWT subjects are caller input: bounded
            self._shares[(user, roles)] = share
        return share


def slots_in_effect(config: GatewayConfig) -> str:
    """The line `serve` logs at start: a wrong `slots` is the likeliest mistake to make."""
    upstream = config.upstream
    if upstream.slots == 0 and not upstream.model_slots:
        return "fair queue off (upstream.slots: 0): requests go to Ollama as they come"
    overrides = ", ".join(f"{glob}={n}" for glob, n in upstream.model_slots.items())
    return (
        f"fair queue: {upstream.slots} slot(s) per model at {upstream.url}"
        + (f" ({overrides})" if overrides else "")
        + "; this must equal Ollama's OLLAMA_NUM_PARALLEL (too low wastes the GPU, "
        "too high brings back Ollama's first-come queue)"
    )
