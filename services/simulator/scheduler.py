"""Admission control and timing for the SGLang **simulator** (no GPU; time is slept, not computed).

:class:`Admission` stands for SGLang's scheduler limits: at most
``max_running_requests`` requests run at once, later ones wait in FIFO order,
and with ``max_queued_requests`` set a request that would make the waiting
queue longer than that is refused (SGLang: 503 "The request queue is full.").
:func:`pause` sleeps for a simulated duration unless the request is aborted first.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["Admission", "QueueFull", "pause"]


class QueueFull(Exception):
    """The waiting queue is at ``max_queued_requests``."""


class Admission:
    """Running slots and a bounded FIFO waiting queue."""

    def __init__(self, max_running: int, max_queued: int | None) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for a running slot."""
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        """No request is running or waiting."""
        return self.running == 0 and not self._waiters

    async def acquire(self, aborted: asyncio.Event) -> bool:
        """Take a running slot, waiting if needed; False if ``aborted`` was set while waiting.

        Raises :class:`QueueFull` when the request would have to wait and the queue is full.
        """
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return True
        if self.max_queued is not None and len(self._waiters) >= self.max_queued:
            raise QueueFull
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        abort_wait = asyncio.ensure_future(aborted.wait())
        try:
            await asyncio.wait({granted, abort_wait}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (client gone): leave the queue, or hand the slot on
            self._withdraw(granted)
            raise
        finally:
            abort_wait.cancel()
        if aborted.is_set():
            self._withdraw(granted)
            return False
        return True

    def _withdraw(self, granted: asyncio.Future[None]) -> None:
        if granted.done() and not granted.cancelled():
            self.release()
        else:
            granted.cancel()
            self._waiters.remove(granted)

    def release(self) -> None:
        """Give a running slot back, handing it straight to the longest-waiting request."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1


async def pause(seconds: float, aborted: asyncio.Event) -> bool:
    """Sleep ``seconds`` unless ``aborted`` is set first; returns True if it was aborted."""
    if aborted.is_set():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(aborted.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
