"""Config checks for the fair queue, registered with the loader (see gateway.config_load)."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.config import GatewayConfig, UpstreamConfig
from gateway.config_load import Problem, register_check
from gateway.policy.models import GLOB_CHARS


def check_slots(path: str, upstream: UpstreamConfig) -> Iterable[Problem]:
    """`slots` and `model_slots` of one upstream (also used per item of `upstreams`)."""
    for glob in upstream.model_slots:
        if not glob or not GLOB_CHARS.fullmatch(glob):
            yield Problem(f"{path}.model_slots.{glob}", "is not a model name or glob")


@register_check
def check_scheduler(config: GatewayConfig) -> Iterable[Problem]:
    yield from check_slots("upstream", config.upstream)
    scheduler = config.scheduler
    if scheduler.max_queue_per_user < 1:
        yield Problem("scheduler.max_queue_per_user", "must be at least 1")
    if scheduler.max_queue < 1:
        yield Problem("scheduler.max_queue", "must be at least 1")
    if scheduler.queue_timeout <= 0:
        yield Problem("scheduler.queue_timeout", "must be greater than 0")
    for name, role in config.roles.items():
        if role.weight <= 0:
            yield Problem(f"roles.{name}.weight", "must be greater than 0")
    for name, user in config.auth.users.items():
        if user.weight is not None and user.weight <= 0:
            yield Problem(f"auth.users.{name}.weight", "must be greater than 0")
