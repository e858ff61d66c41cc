"""GatewayState: the config and everything built from it, swapped as one object on reload.

Each request takes the state current when it arrives and keeps it to its end, so in-flight
streams finish under the config they started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.client_address import Network, parse_networks
from gateway.config import GatewayConfig

if TYPE_CHECKING:
    from gateway.auth.authenticator import Authenticator
    from gateway.policy.policy import Policy


@dataclass(frozen=True, slots=True)
class GatewayState:
    config: GatewayConfig
    authenticator: Authenticator
    policy: Policy
    trusted_proxies: tuple[Network, ...]
    generation: int = 0

    @classmethod
    def build(
        cls, config: GatewayConfig, *, previous: GatewayState | None, **deps: object
    ) -> GatewayState:
        from gateway.auth.authenticator import Authenticator
        from gateway.policy.policy import Policy

        return cls(
            config=config,
            authenticator=Authenticator.from_config(
                config, previous=previous.authenticator if previous else None, **deps
            ),
            policy=Policy.from_config(config),
            trusted_proxies=parse_networks(config.trusted_proxies),
            generation=previous.generation + 1 if previous else 0,
        )


class StateHolder:
    """The one mutable cell: `current` is replaced whole, never edited."""

    __slots__ = ("current",)

    def __init__(self, state: GatewayState) -> None:
        self.current = state

    def swap(self, state: GatewayState) -> GatewayState:
        old, self.current = self.current, state
        return old
