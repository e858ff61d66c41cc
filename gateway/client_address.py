"""Who the client is, believing X-Forwarded-For only from `trusted_proxies`.

A spoofable address must never key limits or lockouts: an untrusted peer's
X-Forwarded-For is ignored entirely.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


@lru_cache(maxsize=4096)
def is_trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def resolve_client(
    peer: str, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> tuple[str, str]:
    """-> (client address, X-Forwarded-For value to send upstream)."""
    if not trusted or not forwarded_for or not is_trusted(peer, trusted):
        return peer, peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    client = peer
    # Walk from the nearest hop outwards; the first address we do not trust is the client.
    for hop in reversed(hops):
        client = hop
        if not is_trusted(hop, trusted):
            break
    return client, ", ".join([*hops, peer])


def forwarded_proto(
    peer: str, claimed: str | None, scheme: str, trusted: tuple[Network, ...]
) -> str:
    """The scheme the client used: a trusted proxy's X-Forwarded-Proto, else our own."""
    if claimed in ("http", "https") and trusted and is_trusted(peer, trusted):
        return claimed
    return scheme
