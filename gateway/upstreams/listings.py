"""Merged answers of several servers, from their catalogues: one model list, every loaded model.

Served from the gateway's own catalogue (never a request upstream per listing), in Ollama's
exact shapes and JSON style (Go's encoding/json: compact, HTML-escaped), then filtered by
what the caller may use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.upstreams.registry import Cluster, Server

Allows = Callable[[str], bool]
_FRACTION = re.compile(r"(\.\d{6})\d+")


def go_json(document: Any) -> bytes:
    """json.Marshal's bytes: compact, UTF-8, `<`, `>`, `&`, U+2028/9 escaped."""
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    for raw, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, escaped)
    return text.encode()


def moment(stamp: Any) -> float:
    """Seconds since the epoch of Ollama's RFC 3339 (nanosecond) times; 0 when unreadable."""
    if not isinstance(stamp, str):
        return 0.0
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", stamp).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def merged_models(cluster: Cluster, allows: Allows) -> list[dict[str, Any]]:
    """One entry per model name, from the server with the newest `modified_at`; newest first."""
    best: dict[str, dict[str, Any]] = {}
    for server in cluster.servers.values():
        for name, entry in server.installed.items():
            if not server.allows(name) or not allows(name):
                continue
            current = best.get(name)
            if current is None or moment(entry.get("modified_at")) > moment(
                current.get("modified_at")
            ):
                best[name] = entry
    return sorted(best.values(), key=lambda e: moment(e.get("modified_at")), reverse=True)


def tags_body(cluster: Cluster, allows: Allows) -> bytes:
    return go_json({"models": merged_models(cluster, allows)})


def _owned_by(name: str) -> str:
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def openai_model(entry: dict[str, Any], model_id: str | None = None) -> dict[str, Any]:
    name = str(entry.get("name", ""))
    return {
        "id": model_id or name,
        "object": "model",
        "created": int(moment(entry.get("modified_at"))),
        "owned_by": _owned_by(model_id or name),
    }


def openai_models_body(cluster: Cluster, allows: Allows) -> bytes:
    data = [openai_model(e) for e in merged_models(cluster, allows)]
    return go_json({"object": "list", "data": data or None}) + b"\n"


def ps_body(cluster: Cluster, allows: Allows) -> bytes:
    """Every server's loaded models, sorted by expiry as Ollama sorts its own."""
    loaded: list[dict[str, Any]] = []
    for server in cluster.servers.values():
        loaded.extend(e for n, e in server.loaded.items() if allows(n))
    loaded.sort(key=lambda e: moment(e.get("expires_at")))
    return go_json({"models": loaded})


def lowest_version(servers: list[Server]) -> str | None:
    """The lowest version among servers (clients check features against it)."""

    def key(version: str) -> tuple[int, ...]:
        digits = re.findall(r"\d+", version.partition("-")[0])
        return tuple(int(d) for d in digits[:3])

    versions = [s.version for s in servers if s.version]
    return min(versions, key=key) if versions else None
