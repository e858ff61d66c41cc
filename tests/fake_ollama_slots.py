"""Ollama's slot behaviour for the fake Ollama: per-model parallelism with a FIFO queue.

What it reproduces (see /work/shared/notes-scheduling.md): each loaded model runs
``OLLAMA_NUM_PARALLEL`` requests at once behind a golang.org/x/sync/semaphore, which serves
waiters strictly first-in first-out and has no depth limit; a waiter whose client goes away
leaves the queue and never runs.  A slot is held from its grant until the response ends.

Every grant is recorded (`Grant`), the highest concurrency per model is kept, and a test can
await a state ("3 waiting for llama3.2:latest") with `Slots.wait_for` instead of sleeping:
an event is set on every change (enqueue, grant, departure, release).

Times are ``time.monotonic()`` seconds.  Models are keyed by their normalised name
(``llama3.2`` is ``llama3.2:latest``), as Ollama does.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tests.fake_ollama_http import RecordedRequest, norm

# Routes that run the model and so take a slot; everything else never waits.
INFERENCE_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)


@dataclass
class Grant:
    """One request let into a model's slot."""

    path: str  # request path (/api/chat, /v1/embeddings, ...)
    model: str  # normalised model name, e.g. "llama3.2:latest"
    request: RecordedRequest  # the request as recorded in FakeOllama.requests
    seq: int  # arrival number of that request at the fake (0-based, never reused)
    queued_at: float  # monotonic time it asked for the slot
    granted_at: float  # monotonic time it got the slot
    wait: float  # granted_at - queued_at, seconds
    running: int  # requests running for this model once granted, itself included
    finished_at: float | None = None  # monotonic time the slot was released (None: still held)

    @property
    def duration(self) -> float | None:
        """Seconds the slot was held (None while still held)."""
        return None if self.finished_at is None else self.finished_at - self.granted_at


@dataclass
class _Waiter:
    fut: asyncio.Future[Grant]
    path: str
    request: RecordedRequest
    seq: int
    queued_at: float


class Slots:
    """Per-model counting semaphores of ``parallel`` (or ``model_parallel[model]``), FIFO.

    A limit of None/0 means unlimited (nothing waits, grants are still recorded).
    """

    def __init__(
        self,
        parallel: int | None = None,
        model_parallel: dict[str, int] | None = None,
        *,
        keep: int | None = None,
    ) -> None:
        self.parallel = parallel or 0
        self.model_parallel = {norm(k): v for k, v in (model_parallel or {}).items()}
        self.keep = keep  # beyond this many grants the oldest half is dropped (long benchmarks)
        self.grants: list[Grant] = []
        self.max_running: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._waiters: dict[str, deque[_Waiter]] = {}
        self._changed = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.parallel or self.model_parallel)

    def limit(self, model: str) -> int:
        return self.model_parallel.get(norm(model), self.parallel) or 0

    def running(self, model: str) -> int:
        return self._running.get(norm(model), 0)

    def waiting(self, model: str) -> int:
        return len(self._waiters.get(norm(model), ()))

    def waiting_requests(self, model: str) -> list[RecordedRequest]:
        """The requests waiting for ``model``, in the order they will be granted."""
        return [w.request for w in self._waiters.get(norm(model), ())]

    async def acquire(self, path: str, model: str, request: RecordedRequest, seq: int) -> Grant:
        """Wait (FIFO) for a slot of ``model``; cancelled (client gone): leaves the queue."""
        key = norm(model)
        queue = self._waiters.setdefault(key, deque())
        now = time.monotonic()
        limit = self.limit(key)
        if limit <= 0 or (not queue and self._running.get(key, 0) < limit):
            grant = self._grant(key, path, request, seq, now)
            self._notify()
            return grant
        waiter = _Waiter(asyncio.get_running_loop().create_future(), path, request, seq, now)
        queue.append(waiter)
        self._notify()
        try:
            return await waiter.fut
        except asyncio.CancelledError:
            if waiter.fut.done() and not waiter.fut.cancelled():
                self.release(waiter.fut.result())  # granted just as its client left
            else:
                if waiter in queue:
                    queue.remove(waiter)
                self._wake(key)  # x/sync/semaphore: a departed head lets the next ones in
                self._notify()
            raise

    def release(self, grant: Grant) -> None:
        """End a grant (idempotent) and let the next waiters of its model in."""
        if grant.finished_at is not None:
            return
        grant.finished_at = time.monotonic()
        self._running[grant.model] -= 1
        self._wake(grant.model)
        self._notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Return once ``predicate()`` holds, re-checked on every slot state change.

        Raises TimeoutError if it does not hold within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("slot state not reached")
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                if predicate():
                    return
                raise TimeoutError("slot state not reached") from None

    # ---------------------------------------------------------------- internals

    def _grant(
        self, key: str, path: str, request: RecordedRequest, seq: int, queued_at: float
    ) -> Grant:
        running = self._running.get(key, 0) + 1
        self._running[key] = running
        if running > self.max_running.get(key, 0):
            self.max_running[key] = running
        now = time.monotonic()
        grant = Grant(path, key, request, seq, queued_at, now, now - queued_at, running)
        self.grants.append(grant)
        if self.keep and len(self.grants) > self.keep:
            del self.grants[: len(self.grants) // 2]
        return grant

    def _wake(self, key: str) -> None:
        queue = self._waiters.get(key)
        limit = self.limit(key)
        while queue and (limit <= 0 or self._running.get(key, 0) < limit):
            w = queue.popleft()
            if w.fut.done():  # cancelled: its task removes nothing more
                continue
            w.fut.set_result(self._grant(key, w.path, w.request, w.seq, w.queued_at))

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()
