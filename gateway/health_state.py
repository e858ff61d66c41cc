"""UpstreamUp: whether the last /readyz probe reached Ollama, for whoever listens (metrics)."""

from __future__ import annotations

from collections.abc import Callable


class UpstreamUp:
    """Last /readyz probe result, read by metrics."""

    __slots__ = ("value", "listeners")

    def __init__(self) -> None:
        self.value: bool | None = None
        self.listeners: list[Callable[[bool], None]] = []

    def set(self, ok: bool) -> None:
        self.value = ok
        for listener in self.listeners:
            listener(ok)
