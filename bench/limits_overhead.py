"""Admission overhead per request: what the admit stage adds, per store, in microseconds.

One "op" is what the admit stage does for a limited request: resolve the principal's
effective limits, `admit`, then `finish` (release the slot, charge the tokens). Sequential
rows are the latency one request pays; the concurrent row is the amortised cost when many
requests are admitted at once (Redis round trips overlap).

    python -m bench.limits_overhead [--ops 20000] [--redis redis://127.0.0.1:6379/0]

Without --redis, a throwaway redis-server is started on a free port when one is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path

from gateway.auth.principal import Principal
from gateway.config import GatewayConfig, LimitsConfig, RoleConfig
from gateway.limits import Limiter
from gateway.limits.memory import MemoryLimiter
from gateway.limits.resolve import limits_for

REPO = str(Path(__file__).resolve().parent.parent)

SCENARIOS: dict[str, LimitsConfig] = {
    "rate only": LimitsConfig(requests_per_minute=1e9, burst=10**9),
    "rate+concurrency+tokens": LimitsConfig(
        requests_per_minute=1e9,
        burst=10**9,
        concurrency=10**6,
        tokens_per_minute=10**12,
        tokens_per_day=10**13,
    ),
}
USERS = 1000


def _config(limits: LimitsConfig) -> GatewayConfig:
    return GatewayConfig(roles={"user": RoleConfig(models=("*",), limits=limits)})


async def _op(limiter: Limiter, config: GatewayConfig, principal: Principal, i: int) -> None:
    limits = limits_for(principal, config)
    lease = f"lease-{i}"
    decision = await limiter.admit(principal.user, limits, lease)
    assert decision.allowed
    await limiter.finish(principal.user, lease, 120, limits)


async def sequential(limiter: Limiter, limits: LimitsConfig, ops: int) -> list[float]:
    """Per-op latency in µs, cycling over USERS principals."""
    config = _config(limits)
    principals = [Principal(f"user{i}", frozenset({"user"}), "basic") for i in range(USERS)]
    samples = []
    for i in range(ops):
        started = time.perf_counter_ns()
        await _op(limiter, config, principals[i % USERS], i)
        samples.append((time.perf_counter_ns() - started) / 1000)
    return samples


async def concurrent(limiter: Limiter, limits: LimitsConfig, ops: int, width: int = 64) -> float:
    """Amortised µs per op with `width` requests in flight."""
    config = _config(limits)
    principals = [Principal(f"user{i}", frozenset({"user"}), "basic") for i in range(USERS)]

    async def worker(start: int) -> None:
        for i in range(start, ops, width):
            await _op(limiter, config, principals[i % USERS], i)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(width)))
    return (time.perf_counter() - started) / ops * 1e6


def _row(store: str, scenario: str, samples: list[float]) -> str:
    cuts = statistics.quantiles(samples, n=100)
    return (
        f"| {store:<6} | {scenario:<24} | {statistics.fmean(samples):>9.1f} | "
        f"{cuts[49]:>9.1f} | {cuts[98]:>9.1f} |"
    )


async def bench(ops: int, redis_url: str | None) -> None:
    stores: list[tuple[str, Callable[[], Limiter]]] = [
        ("memory", lambda: MemoryLimiter(max_keys=100_000)),
    ]
    if redis_url:
        from gateway.limits.redis import RedisLimiter

        stores.append(("redis", lambda: RedisLimiter(redis_url)))
    print(f"admit + finish per request ({ops} ops each, {USERS} users; µs)\n")
    print("| store  | limits                   |      mean |       p50 |       p99 |")
    print("|--------|--------------------------|-----------|-----------|-----------|")
    amortised: list[str] = []
    for store, make in stores:
        for scenario, limits in SCENARIOS.items():
            limiter = make()
            try:
                await sequential(limiter, limits, min(ops, 500))  # warm up (scripts, pools)
                print(_row(store, scenario, await sequential(limiter, limits, ops)))
                per_op = await concurrent(limiter, limits, ops)
                amortised.append(f"| {store:<6} | {scenario:<24} | {per_op:>9.1f} |")
            finally:
                await limiter.close()
    print("\namortised with 64 requests in flight (µs per request)\n")
    print("| store  | limits                   |    per op |")
    print("|--------|--------------------------|-----------|")
    print("\n".join(amortised))


async def _with_redis(ops: int, url: str | None) -> None:
    if url is not None or shutil.which("redis-server") is None:
        if url is None:
            print("(redis-server not installed: memory store only)\n")
        await bench(ops, url)
        return
    sys.path.insert(0, REPO)  # run as a script: make `tests` importable
    from tests.redis_server import RedisServer

    server = await asyncio.to_thread(RedisServer(shutil.which("redis-server") or "").start)
    try:
        await bench(ops, server.url)
    finally:
        await asyncio.to_thread(server.stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--redis", help="use this Redis instead of starting one")
    args = parser.parse_args(argv)
    run: Callable[[Awaitable[None]], None] = asyncio.run  # type: ignore[assignment]
    with suppress(ImportError):
        import uvloop

        run = uvloop.run  # type: ignore[assignment]
    run(_with_redis(args.ops, args.redis))


if __name__ == "__main__":
    main()
