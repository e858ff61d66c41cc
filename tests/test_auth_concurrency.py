"""Cold password verifications run off the event loop: a flowing stream never stalls."""

from __future__ import annotations

import asyncio
import hashlib
import json

from gateway.auth.hashes import passlib_hash
from tests.auth_support import authenticator, basic, bearer, config

CHUNK_DELAY = 0.05
KEY = "ogw_streamer-key-abcdefghijklmnopqrstuvwxyz012345"


async def test_twenty_cold_bcrypt_logins_do_not_stall_a_stream(gateway_factory, fake, http) -> None:
    # A stream far longer than the hashing; the client leaves once the logins are done.
    fake.chunks, fake.chunk_delay = 400, CHUNK_DELAY
    real_cost = passlib_hash.bcrypt.using(rounds=11).hash("correct horse")  # ~100+ ms each
    users = {f"user{i}": {"password": real_cost} for i in range(20)}
    gw = await gateway_factory(
        config(
            fake,
            users=users,
            api_keys=[{"name": "streamer", "sha256": hashlib.sha256(KEY.encode()).hexdigest()}],
        )
    )
    loop = asyncio.get_running_loop()
    body = {"model": "llama3.2", "prompt": "tell me a story", "stream": True}
    arrivals: list[float] = []
    logins_started = asyncio.Event()
    login_results: list[tuple[int, float]] = []

    async def login(user: str) -> None:
        async with http.get(f"{gw.url}/api/tags", headers=basic(user, "correct horse")) as r:
            await r.read()
            login_results.append((r.status, loop.time()))

    async def logins() -> None:
        await logins_started.wait()
        await asyncio.gather(*(login(u) for u in users))

    login_task = asyncio.create_task(logins())
    async with http.post(f"{gw.url}/api/generate", json=body, headers=bearer(KEY)) as r:
        assert r.status == 200
        async for line in r.content:
            json.loads(line)
            arrivals.append(loop.time())
            if len(arrivals) == 5:
                logins_started.set()
            if login_task.done():
                break  # one chunk after the last login: the window is fully observed
    await login_task

    assert [status for status, _ in login_results] == [200] * 20
    assert authenticator(gw).basic.verifications == 20  # twenty cold hashes really ran
    # The chunks that arrived while the hashes were running:
    hashing_until = max(t for _, t in login_results)
    during = [t for t in arrivals[4:] if t <= hashing_until]
    assert len(during) >= 10, "the stream should have flowed during the hashing"
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    # A hash on the loop would stall it for 100+ ms each (20 in a row: seconds); the margin
    # only absorbs scheduler noise on a busy 2-core CI box.
    assert max(gaps) < CHUNK_DELAY + 0.2, f"stream stalled: max gap {max(gaps):.3f}s"
