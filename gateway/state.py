"""GatewayState: the config and everything built from it, swapped as one object on reload.

Each request takes the state current when it arrives and keeps it to its end, so in-flight
streams finish under the config they started with.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.client_address import Network, parse_networks
from gateway.config import GatewayConfig

if TYPE_CHECKING:
    from gateway.auth.authenticator import Authenticator
    from gateway.policy.policy import Policy
    from gateway.scheduler.policy import GatewaySchedulingPolicy

T = TypeVar("T")
MEMO_SIZE = 10_000  # bounded: JWT subjects and role sets are caller-chosen


@dataclass(frozen=True, slots=True)
class GatewayState:
    config: GatewayConfig
    authenticator: Authenticator
    policy: Policy
    trusted_proxies: tuple[Network, ...]
    scheduling: GatewaySchedulingPolicy
    generation: int = 0
    _memo: dict[Hashable, Any] = field(default_factory=dict, compare=False, repr=False)

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """A value derived from this config only (a principal's limits...), computed once."""
        try:
            return self._memo[key]  # type: ignore[no-any-return]
        except KeyError:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            value = self._memo[key] = compute()
            return value

    @classmethod
    def build(
        cls, config: GatewayConfig, *, previous: GatewayState | None, **deps: object
    ) -> GatewayState:
        from gateway.auth.authenticator import Authenticator
        from gateway.policy.policy import Policy
        from gateway.scheduler.policy import GatewaySchedulingPolicy

        return cls(
            config=config,
            authenticator=Authenticator.from_config(
                config, previous=previous.authenticator if previous else None, **deps
            ),
            policy=Policy.from_config(config),
            trusted_proxies=parse_networks(config.trusted_proxies),
            scheduling=GatewaySchedulingPolicy.from_config(config),
            generation=previous.generation + 1 if previous else 0,
        )


class StateHolder:
    """The one mutable cell: `current` is replaced whole, never edited."""

    __slots__ = ("current", "on_swap")

    def __init__(self, state: GatewayState) -> None:
        self.current = state
        # Parts that outlive a config (the scheduler) learn of the new one here.
        self.on_swap: list[Callable[[GatewayState], None]] = []

    def swap(self, state: GatewayState) -> GatewayState:
        old, self.current = self.current, state
        for listener in self.on_swap:
            listener(state)
        return old
