"""Config checks for several upstreams, registered with the loader (see gateway.config_load)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from gateway.config import GatewayConfig
from gateway.config_load import Problem, register_check
from gateway.policy.models import GLOB_CHARS

NAME = re.compile(r"[a-z0-9-]+")
MAX_NAME = 63


@register_check
def check_upstreams(config: GatewayConfig) -> Iterable[Problem]:
    if config.upstreams is None:
        return
    if not config.upstreams:
        yield Problem("upstreams", "needs at least one server")
    seen: set[str] = set()
    for i, upstream in enumerate(config.upstreams):
        path = f"upstreams[{i}]"
        if not NAME.fullmatch(upstream.name) or len(upstream.name) > MAX_NAME:
            yield Problem(f"{path}.name", "must be lower-case letters, digits and -")
        elif upstream.name in seen:
            yield Problem(f"{path}.name", f"{upstream.name!r} is used twice")
        seen.add(upstream.name)
        for j, glob in enumerate(upstream.models or ()):
            if not glob or not GLOB_CHARS.fullmatch(glob):
                yield Problem(f"{path}.models[{j}]", "is not a model name or glob")
