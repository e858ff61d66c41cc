"""Cold password checks shared fairly: queued per client address, served round-robin.

A password hash costs ~50-500 ms of CPU by design. With one shared FIFO, one address's burst
of guesses would delay every other login by the whole burst. Here each address has its own
queue and runs at most `per_address` hashes at once; when a thread frees, the next address
in turn is served. A login from another address therefore waits for at most one hash to
end. Queues are bounded per address (429 for that address only) and in all (503).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, Final, Generic, TypeVar

from gateway.errors import ServiceUnavailable, TooManyRequests

T = TypeVar("T")

MAX_WAITING_PER_ADDRESS: Final = 64
MAX_WAITING: Final = 1024
BUSY_RETRY_AFTER: Final = {"Retry-After": "1"}


class HashJob(Generic[T]):
    """One queued computation. `started` tells whether its hash was really spent."""

    __slots__ = ("address", "call", "future", "started")

    def __init__(self, address: str, call: Callable[[], T], future: asyncio.Future[T]) -> None:
        self.address = address
        self.call = call
        self.future = future
        self.started = False


class FairHashQueue:
    """Round-robin over addresses in front of `workers` threads of `executor`."""

    __slots__ = ("_executor", "_workers", "_per_address", "_waiting", "_running", "_busy", "_size")

    def __init__(self, executor: Callable[[], Executor], *, workers: int, per_address: int) -> None:
        self._executor = executor
        self._workers = workers
        self._per_address = per_address
        # Ring order: the address served last moves to the end.
        self._waiting: OrderedDict[str, deque[HashJob[Any]]] = OrderedDict()
        self._running: dict[str, int] = {}
        self._busy = 0
        self._size = 0  # jobs waiting, all addresses

    def submit(self, address: str, call: Callable[[], T]) -> HashJob[T]:
        """Queue `call` for `address`, or raise 429 (this address) / 503 (everyone)."""
        queue = self._waiting.get(address)
        if queue is not None and len(queue) >= MAX_WAITING_PER_ADDRESS:
            raise TooManyRequests(
                "too many logins in progress from this address",
                reason="auth_busy",
                headers=BUSY_RETRY_AFTER,
            )
        if self._size >= MAX_WAITING:
            raise ServiceUnavailable(
                "too many logins in progress", reason="auth_busy", headers=BUSY_RETRY_AFTER
            )
        job = HashJob(address, call, asyncio.get_running_loop().create_future())
        if queue is None:
            queue = self._waiting[address] = deque()
        queue.append(job)
        self._size += 1
        self._dispatch()
        return job

    async def wait(self, job: HashJob[T]) -> T:
        """The job's result. A caller that leaves takes a job not yet started off the queue;
        a started one finishes in its thread (its thread stays counted until then)."""
        try:
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            if not job.started:
                self._withdraw(job)
            raise

    def _withdraw(self, job: HashJob[Any]) -> None:
        queue = self._waiting.get(job.address)
        if queue is not None and job in queue:
            queue.remove(job)
            self._size -= 1
            if not queue:
                del self._waiting[job.address]
        job.future.cancel()

    def _dispatch(self) -> None:
        while self._busy < self._workers:
            job = self._next()
            if job is None:
                return
            self._start(job)

    def _next(self) -> HashJob[Any] | None:
        for address, queue in self._waiting.items():
            if self._running.get(address, 0) < self._per_address:
                job = queue.popleft()
                self._size -= 1
                if queue:
                    self._waiting.move_to_end(address)  # the others go first next time
                else:
                    del self._waiting[address]
                return job
        return None

    def _start(self, job: HashJob[Any]) -> None:
        job.started = True
        self._busy += 1
        self._running[job.address] = self._running.get(job.address, 0) + 1
        try:
            done = asyncio.wrap_future(self._executor().submit(job.call))
        except RuntimeError as error:  # the executor was shut down (the app is closing)
            done = asyncio.get_running_loop().create_future()
            done.set_exception(error)
        done.add_done_callback(lambda finished: self._finished(job, finished))

    def _finished(self, job: HashJob[Any], finished: asyncio.Future[Any]) -> None:
        # Released when the thread is done, not when the caller left: the CPU was busy.
        self._busy -= 1
        running = self._running[job.address] - 1
        if running:
            self._running[job.address] = running
        else:
            del self._running[job.address]
        if not job.future.done():
            if finished.cancelled():
                job.future.cancel()
            elif (error := finished.exception()) is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(finished.result())
        self._dispatch()

    @property
    def waiting(self) -> int:
        return self._size

    @property
    def running(self) -> int:
        return self._busy
