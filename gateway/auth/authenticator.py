"""PLACEHOLDER until the authentication issue lands: credentials are refused."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDictProxy

from gateway.auth.principal import Principal
from gateway.config import GatewayConfig
from gateway.errors import Unauthorized


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self.realm = config.auth.realm

    @classmethod
    def from_config(
        cls, config: GatewayConfig, *, previous: Authenticator | None = None, **_: Any
    ) -> Authenticator:
        return cls(config)

    async def authenticate(
        self, headers: CIMultiDictProxy[str], client_ip: str
    ) -> Principal | None:
        if "Authorization" in headers or "X-API-Key" in headers:
            raise Unauthorized(
                "invalid credentials", headers={"WWW-Authenticate": f'Basic realm="{self.realm}"'}
            )
        return None
