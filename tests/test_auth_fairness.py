"""Cold password checks are shared fairly: one address's burst cannot starve another's login."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest

from gateway.auth.hash_queue import MAX_WAITING_PER_ADDRESS, FairHashQueue
from gateway.auth.hashes import passlib_hash
from gateway.errors import TooManyRequests
from tests.auth_support import authenticator, basic
from tests.conftest import until

PASSWORD = "correct horse battery staple"
ATTACKER = {"X-Forwarded-For": "203.0.113.7"}
COLLEAGUE = {"X-Forwarded-For": "198.51.100.2"}


async def test_round_robin_across_addresses() -> None:
    """Address A queues five hashes; B and C each one: they wait for one hash, not five."""
    started: list[str] = []
    gates = {name: threading.Event() for name in ("a1", "a2", "a3", "a4", "a5", "b1", "c1")}

    def work(name: str) -> str:
        started.append(name)
        gates[name].wait(10)
        return name

    with ThreadPoolExecutor(2) as pool:
        queue = FairHashQueue(lambda: pool, workers=2, per_address=1)
        jobs = [queue.submit("A", lambda n=f"a{i}": work(n)) for i in range(1, 6)]  # type: ignore[misc]
        jobs.append(queue.submit("B", lambda: work("b1")))
        jobs.append(queue.submit("C", lambda: work("c1")))
        await until(lambda: len(started) == 2)
        assert started == ["a1", "b1"]  # A holds one thread at most: B got the other
        assert queue.waiting == 5
        gates["a1"].set()
        await until(lambda: len(started) == 3)
        gates["b1"].set()
        await until(lambda: len(started) == 4)
        assert started == ["a1", "b1", "a2", "c1"]  # C waited for one hash, not A's five
        for gate in gates.values():
            gate.set()
        results = await asyncio.gather(*(queue.wait(job) for job in jobs))
    assert sorted(results) == sorted(gates)
    assert queue.waiting == 0 and queue.running == 0


async def test_a_caller_that_leaves_takes_its_queued_hash_away() -> None:
    gate = threading.Event()
    ran: list[int] = []

    def work(i: int) -> int:
        ran.append(i)
        gate.wait(10)
        return i

    with ThreadPoolExecutor(1) as pool:
        queue = FairHashQueue(lambda: pool, workers=1, per_address=1)
        first = queue.submit("A", lambda: work(1))
        second = queue.submit("A", lambda: work(2))
        waiter = asyncio.ensure_future(queue.wait(second))
        await until(lambda: ran == [1])
        await asyncio.sleep(0)  # one loop turn: the waiter is now awaiting its job
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert queue.waiting == 0  # withdrawn before it ran
        gate.set()
        assert await queue.wait(first) == 1
    assert ran == [1]  # the withdrawn hash never ran


async def test_one_address_queue_is_bounded_without_refusing_others() -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        queue = FairHashQueue(lambda: pool, workers=1, per_address=1)
        jobs = [
            queue.submit("A", lambda: gate.wait(10)) for _ in range(MAX_WAITING_PER_ADDRESS + 1)
        ]
        with pytest.raises(TooManyRequests):
            queue.submit("A", lambda: gate.wait(10))
        jobs.append(queue.submit("B", lambda: gate.wait(10)))  # another address still queues
        gate.set()
        assert all(await asyncio.gather(*(queue.wait(job) for job in jobs)))


async def test_a_burst_from_one_address_does_not_delay_another_login(
    gateway_factory: Any, fake: Any
) -> None:
    """1,000 guesses at concurrency 1,000 from one address (half at one user, half at
    made-up names); meanwhile a colleague's cold login from another address is timed."""
    cost = passlib_hash.bcrypt.using(rounds=9)  # ~40-80 ms: real hashing, a short test
    gw = await gateway_factory(
        {
            "upstream": {"url": fake.url},
            "trusted_proxies": ["127.0.0.1/32"],
            "auth": {
                "users": {
                    "alice": {"password": cost.hash(PASSWORD)},
                    "colleague": {"password": cost.hash(PASSWORD)},
                }
            },
        }
    )
    queue = authenticator(gw)._resources.hash_queue
    loop = asyncio.get_running_loop()

    async def guess(session: aiohttp.ClientSession, i: int) -> tuple[str, int]:
        user = "alice" if i % 2 else f"made-up-{i}"
        headers = {**ATTACKER, **basic(user, f"guess-{i}")}
        async with session.get(f"{gw.url}/api/tags", headers=headers) as r:
            return user, r.status

    connector = aiohttp.TCPConnector(limit=1000)
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as attacker,
        aiohttp.ClientSession(timeout=timeout) as colleague,
    ):
        burst = asyncio.gather(*(guess(attacker, i) for i in range(1000)))
        await until(lambda: queue.waiting >= 20, within=30)  # the burst is queued up
        started = loop.time()
        headers = {**COLLEAGUE, **basic("colleague", PASSWORD)}
        async with colleague.get(f"{gw.url}/api/tags", headers=headers) as r:
            assert r.status == 200
        elapsed = loop.time() - started
        still_queued = queue.waiting
        results = await burst

    assert still_queued > 0, "the burst should still have been hashing"
    assert elapsed < 1.0, f"a cold login from another address took {elapsed:.2f}s"
    alice = [status for user, status in results if user == "alice"]
    assert alice.count(401) == 10  # max_failures hashes for the attacked user, no more
    assert set(alice) == {401, 429}
    assert {status for _, status in results} <= {401, 429}
    # Every hash the attack cost produced one 401: at most max_failures for alice plus the
    # address ceiling (10 x max_failures) for the made-up names.
    hashes = authenticator(gw).basic.verifications - 1  # minus the colleague's
    assert hashes == sum(status == 401 for _, status in results) <= 10 + 100
