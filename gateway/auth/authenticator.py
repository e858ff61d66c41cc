"""The Authenticator: request headers -> Principal, or a 401/429. It never knows routes.

Built from one config (cheap and synchronous: the only I/O is reading the htpasswd file
and a PEM public key); rebuilt on every reload with a fresh verified-password cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDictProxy

from gateway.auth.api_keys import ApiKeyTable
from gateway.auth.basic import BasicVerifier
from gateway.auth.cache import VerifiedCache
from gateway.auth.credentials import Attempt, read_attempt
from gateway.auth.failure import AuthFailure
from gateway.auth.lockout import Lockout, address_key, build_lockout
from gateway.auth.principal import Principal
from gateway.auth.resources import AuthResources
from gateway.auth.tokens import JwtVerifier
from gateway.config import GatewayConfig
from gateway.errors import Unauthorized


class Authenticator:
    """Verifies Basic, API key and JWT credentials per `config.auth`.

    `clock` (epoch seconds, default `time.time`) drives key/token expiry, the password
    cache, lockouts and JWKS refreshes, so tests never sleep to a deadline.
    """

    __slots__ = ("realm", "_challenge", "basic", "_keys", "jwt", "_lockout", "_resources")

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Callable[[], float],
        resources: AuthResources,
        lockout: Lockout,
    ) -> None:
        auth = config.auth
        self.realm = auth.realm
        realm = auth.realm.replace("\\", "\\\\").replace('"', '\\"')  # a quoted-string
        self._challenge = {"WWW-Authenticate": f'Basic realm="{realm}"'}
        self._resources = resources
        self._lockout = lockout
        self.basic = BasicVerifier(auth, resources=resources, lockout=lockout, clock=clock)
        self._keys = ApiKeyTable(auth.api_keys, clock=clock)
        self.jwt = (
            JwtVerifier(
                auth.jwt,
                resources=resources,
                clock=clock,
                cache=VerifiedCache(ttl=auth.cache_seconds, max_size=auth.cache_size, clock=clock),
            )
            if auth.jwt
            else None
        )

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        *,
        previous: Authenticator | None = None,
        **deps: Any,
    ) -> Authenticator:
        """`deps` may carry `clock`; other components' test doubles are ignored."""
        clock: Callable[[], float] = deps.get("clock") or time.time
        lockout_config = config.auth.lockout
        if previous is None:
            return cls(
                config,
                clock=clock,
                resources=AuthResources(),
                lockout=build_lockout(
                    lockout_config, config.rate_limits.store, clock=deps.get("clock")
                ),
            )
        # Shared: threads, the JWKS session and lockouts. Never the password cache.
        return cls(
            config,
            clock=clock,
            resources=previous._resources,
            lockout=previous.lockout.configure(lockout_config),
        )

    @property
    def lockout(self) -> Lockout:
        return self._lockout

    def read_attempt(self, headers: CIMultiDictProxy[str]) -> Attempt | None:
        """What the request tries (for metrics even when it fails); None: no credentials."""
        return read_attempt(headers, jwt_enabled=self.jwt is not None)

    async def authenticate(
        self, headers: CIMultiDictProxy[str], client_ip: str
    ) -> Principal | None:
        """None when the request carries no credentials at all; else a Principal or raise."""
        attempt = self.read_attempt(headers)
        if attempt is None:
            return None
        return await self.verify(attempt, client_ip)

    async def verify(self, attempt: Attempt, client_ip: str) -> Principal:
        address = address_key(client_ip)
        try:
            if attempt.problem is not None:
                raise AuthFailure(attempt.problem)
            if attempt.method == "basic":
                return await self.basic.verify(attempt.value, address)
            if attempt.method == "jwt" and self.jwt is not None:
                return await self.jwt.verify(attempt.value)
            return self._keys.verify(attempt.value)
        except AuthFailure as failure:
            delay = failure.delay
            # Names no known user: counted against the address. An unreachable issuer is
            # nobody's guess: it must not push an office's address toward its ceiling.
            if delay is None and failure.reason != "jwks_unavailable":
                delay = await self._lockout.settle(address, None, "", failed=True)
            if delay:
                await asyncio.sleep(delay)  # slows guessing; costs us only a timer
            # `from None`: no chained exception that could carry a credential into a log.
            raise Unauthorized(
                failure.message, reason=failure.reason, headers=self._challenge
            ) from None

    async def close(self) -> None:
        """Release threads, the JWKS session and the lockout store (shared by generations)."""
        await self._resources.close()
        await self._lockout.close()
