"""Config checks for authorisation: model globs, route paths, CORS origins.

A rule path in another spelling than the canonical one would silently never match (a
`deny` that never denies), so it is an error, not a warning.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import GatewayConfig
from gateway.config_load import Problem, register_check
from gateway.policy.models import GLOB_CHARS
from gateway.policy.origins import origin_pattern_problem
from gateway.policy.paths import PathError, canonical_path

GLOB_MESSAGE = "must be a model name or glob (letters, digits, . _ - : / @ + and *)"


def _globs(path: str, globs: Iterable[str]) -> Iterable[Problem]:
    for i, glob in enumerate(globs):
        if not GLOB_CHARS.fullmatch(glob):
            yield Problem(f"{path}[{i}]", GLOB_MESSAGE)


@register_check
def check_policy(config: GatewayConfig) -> Iterable[Problem]:
    for name, role in config.roles.items():
        yield from _globs(f"roles.{name}.models", role.models)
    for name, user in config.auth.users.items():
        yield from _globs(f"auth.users.{name}.models", user.models or ())
    for i, rule in enumerate(config.routes or ()):
        if not rule.path.startswith("/"):
            continue  # reported by the loader's own route check
        try:
            canonical = canonical_path(rule.path)
        except PathError as exc:
            yield Problem(f"routes[{i}].path", f"{exc} (write paths decoded: /api/pull)")
            continue
        if canonical != (rule.path.rstrip("/") or "/"):
            yield Problem(
                f"routes[{i}].path",
                f"never matches a request: requests are compared in the form {canonical!r}",
            )
    for i, origin in enumerate(config.cors.origins):
        problem = origin_pattern_problem(origin)
        if problem:
            yield Problem(f"cors.origins[{i}]", problem)
