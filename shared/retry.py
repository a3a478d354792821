"""One retry policy for calls to other services (SGLang servers, tool APIs), run by ``stamina``.

A call is retried only when its error is transient (the caller says which), at most
``max_retries`` times, with exponential backoff plus jitter: before retry *n* it waits
``min(max_backoff_s, backoff_s * 2**(n-1)) + uniform(0, backoff_s)``, or longer when the
server asked for it (``Retry-After``). With a ``deadline`` (a ``time.monotonic()`` value)
no wait is started that would end past it, so the whole call — attempts and waits —
never outlasts the deadline; the last error is raised instead.

Usage::

    policy = RetryPolicy(max_retries=4, backoff_s=0.5)
    result = policy.call(
        lambda attempt: send(attempt),               # attempt: 1, 2, ...
        transient=lambda exc: isinstance(exc, Busy),
        deadline=time.monotonic() + 30,
    )
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import stamina
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RetryPolicy"]

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How often and how patiently a transient failure is retried."""

    model_config = ConfigDict(frozen=True)

    max_retries: int = Field(default=2, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)

    def delay_s(self, retry: int, *, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), jittered; honours ``Retry-After``."""
        delay = min(self.backoff_s * 2 ** (retry - 1), self.max_backoff_s) + random.uniform(0, self.backoff_s)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay

    def call(
        self,
        attempt: Callable[[int], T],
        *,
        transient: Callable[[Exception], bool],
        deadline: float | None = None,
        retry_after_s: Callable[[Exception], float | None] = lambda _exc: None,
        on_retry: Callable[[Exception, int, float], None] | None = None,
    ) -> T:
        """``attempt(n)`` for n = 1, 2, … until it returns; a final error propagates unchanged.

        ``transient(exc)`` says whether an error may be retried; ``retry_after_s(exc)`` is
        the wait the server asked for, if any; ``on_retry(exc, n, delay)`` is told of each
        retry before its wait (for a log line).
        """
        failures = 0

        def backoff(exc: Exception) -> bool | float:
            nonlocal failures
            failures += 1
            if not transient(exc) or failures > self.max_retries:
                return False
            delay = self.delay_s(failures, retry_after_s=retry_after_s(exc))
            if deadline is not None and time.monotonic() + delay >= deadline:
                return False  # waiting would end past the deadline: the error is final
            if on_retry is not None:
                on_retry(exc, failures, delay)
            return delay

        for step in stamina.retry_context(on=backoff, attempts=self.max_retries + 1, timeout=None):
            with step:
                return attempt(step.num)
        raise AssertionError("unreachable: stamina re-raises the last error")
