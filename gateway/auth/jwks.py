"""A JWKS endpoint, fetched with aiohttp, cached, refreshed on an unknown `kid`.

Refetches are rate-limited (`jwks_min_refresh_seconds`) and coalesced: a flood of tokens
with made-up `kid`s costs the issuer at most one request per interval, and key rotation
still works (a new `kid` triggers a refresh once the interval has passed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Final

import aiohttp
from jwt import PyJWK
from jwt.exceptions import PyJWKError

from gateway.auth.failure import AuthFailure

log = logging.getLogger("gateway.auth")

MAX_JWKS_BYTES: Final = 1 << 20


class JwksCache:
    __slots__ = (
        "url",
        "_cache_seconds",
        "_min_refresh",
        "_clock",
        "_session",
        "_keys",
        "_parsed",
        "_fetched_at",
        "_attempted_at",
        "_refreshing",
        "fetches",
    )

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float,
        min_refresh: float,
        clock: Callable[[], float],
        session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self.url = url
        self._cache_seconds = cache_seconds
        self._min_refresh = min_refresh
        self._clock = clock
        self._session = session
        self._keys: dict[str | None, dict[str, Any]] | None = None  # kid -> JWK
        self._parsed: dict[tuple[str | None, str], Any] = {}  # (kid, alg) -> key object
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.fetches = 0  # HTTP requests made to the issuer (tests, metrics)

    async def key(self, kid: str | None, alg: str) -> Any:
        """The verification key for a token's `kid` and (already allowed) `alg`."""
        if self._clock() - self._fetched_at >= self._cache_seconds:
            await self._refresh()
        jwk = self._find(kid)
        if jwk is None:
            await self._refresh()  # maybe a rotation: rate-limited inside
            jwk = self._find(kid)
        if jwk is None:
            raise AuthFailure("jwks_unavailable" if self._keys is None else "invalid_token")
        return self._parse(kid, jwk, alg)

    def _find(self, kid: str | None) -> dict[str, Any] | None:
        if self._keys is None:
            return None
        if kid is None and len(self._keys) == 1:  # a lone key needs no kid
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    def _parse(self, kid: str | None, jwk: dict[str, Any], alg: str) -> Any:
        cached = self._parsed.get((kid, alg))
        if cached is not None:
            return cached
        # A JWK pinned to another algorithm, or meant for encryption, never verifies.
        if jwk.get("alg", alg) != alg or jwk.get("use", "sig") != "sig":
            raise AuthFailure("invalid_token")
        try:
            # PyJWK refuses a key whose type does not fit `alg` (an RSA key for HS256...).
            key = PyJWK(jwk, algorithm=alg).key
        except (PyJWKError, ValueError, TypeError, KeyError):
            raise AuthFailure("invalid_token") from None
        self._parsed[(kid, alg)] = key
        return key

    async def _refresh(self) -> None:
        if self._refreshing is None:
            if self._clock() - self._attempted_at < self._min_refresh:
                return  # rate limit: the issuer is not ours to hammer
            self._attempted_at = self._clock()
            self._refreshing = asyncio.ensure_future(self._fetch())
            self._refreshing.add_done_callback(self._refreshed)
        await asyncio.shield(self._refreshing)

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            async with self._session().get(self.url, allow_redirects=False) as response:
                if response.status != 200:
                    log.warning(
                        "JWKS %s answered %d; keeping cached keys", self.url, response.status
                    )
                    return
                body = await response.content.read(MAX_JWKS_BYTES + 1)
            if len(body) > MAX_JWKS_BYTES:
                log.warning("JWKS %s is larger than %d bytes; ignored", self.url, MAX_JWKS_BYTES)
                return
            document = json.loads(body)
            keys = {k.get("kid"): k for k in document["keys"] if isinstance(k, dict) and "kty" in k}
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning(
                "JWKS %s unreachable (%s); keeping cached keys", self.url, type(exc).__name__
            )
            return
        except (ValueError, KeyError, TypeError):
            log.warning("JWKS %s is not a JWK set; keeping cached keys", self.url)
            return
        self._keys = keys
        self._parsed.clear()
        self._fetched_at = self._clock()
        log.info("JWKS %s fetched: %d keys", self.url, len(keys))
