"""Watchdog: one timer per stream that cancels a task stuck waiting too long.

Two timers rescheduled per chunk cost more than the chunk; this one wakes at most once per
`timeout` and only fires when a wait has lasted that long. Time spent elsewhere (writing to a
slow client, sending a request body upstream) does not count: the owner says when a wait
starts (`arm`) and ends (`pause`).
"""

from __future__ import annotations

import asyncio


class Watchdog:
    """Cancels the task that created it once a wait started by `arm` lasts `timeout` seconds.

    After the cancellation, `fired()` tells the task the cancellation was the watchdog's (and
    takes it back), so it can answer 504/408 instead of treating it as the client leaving.
    """

    __slots__ = ("reading", "timeout", "_since", "_task", "_loop", "_handle", "_fired")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.timeout = timeout
        self._fired = False
        self._since = self._loop.time()
        self.reading = False
        self._handle = self._loop.call_at(self._since + timeout, self._check)

    def arm(self) -> None:
        """A wait starts now."""
        self._since = self._loop.time()
        self.reading = True

    def pause(self) -> None:
        """The wait ended (or time from now on is not the watched side's to answer for)."""
        self.reading = False

    def _check(self) -> None:
        due = self._since + self.timeout
        if self.reading and self._loop.time() >= due and self._task is not None:
            self._fired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at(
            due if self.reading else self._loop.time() + self.timeout, self._check
        )

    def set_timeout(self, timeout: float) -> None:
        self.timeout = timeout
        self._handle.cancel()
        self._handle = self._loop.call_at(self._loop.time() + timeout, self._check)

    def fired(self) -> bool:
        """True when the cancellation was ours; then it is taken back (uncancel)."""
        if self._fired and self._task is not None:
            self._task.uncancel()
        return self._fired

    def stop(self) -> None:
        self._handle.cancel()
