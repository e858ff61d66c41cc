"""The lockout's one series: blocks started, by scope. Registered on the app's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from gateway.auth.lockout import BlockScope, Lockout

SCOPES: tuple[BlockScope, ...] = ("user", "address")


def count_blocks(registry: CollectorRegistry, lockout: Lockout) -> Counter:
    """`ollama_gateway_auth_lockouts_total{scope}`: each block once, when it starts (the
    429s it causes are `ollama_gateway_rate_limited_total{limit="locked_out"}`)."""
    counter = Counter(
        "ollama_gateway_auth_lockouts",
        "Lockout blocks started: scope=user (one user from one address, after max_failures "
        "failed passwords), scope=address (its fresh password checks, past the ceiling).",
        ("scope",),
        registry=registry,
    )
    children = {scope: counter.labels(scope=scope) for scope in SCOPES}  # visible at 0
    lockout.on_block.append(lambda scope: children[scope].inc())
    return counter
