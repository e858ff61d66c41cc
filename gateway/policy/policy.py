"""PLACEHOLDER until the authorisation issue lands."""

from __future__ import annotations

from gateway.config import GatewayConfig


class Policy:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: GatewayConfig) -> Policy:
        return cls(config)
