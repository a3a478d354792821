"""Readiness (``GET /readyz``): can this gateway reach PostgreSQL and the broker right now?

Each check runs in a worker thread under one overall bound, so an unreachable host that
swallows packets (no refusal, no reset) makes the probe answer ``503`` in a few seconds
instead of hanging; a thread stuck in such a connect finishes on its own later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kombu import Connection
from sqlalchemy import text
from sqlalchemy.engine import Engine

__all__ = ["READY_TIMEOUT_S", "check_broker", "check_database", "unready_dependencies"]

logger = logging.getLogger(__name__)

#: The longest a readiness probe takes.
READY_TIMEOUT_S = 3.0


def check_database(engine: Engine) -> None:
    """``SELECT 1`` through the engine's pool (which pings and replaces a dead pooled connection)."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def check_broker(broker_url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Open (and close) a connection to the broker: one try, at most ``timeout_s`` to connect."""
    with Connection(broker_url, connect_timeout=timeout_s) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)


async def _failure(name: str, check: Callable[[], None], timeout_s: float) -> str | None:
    """``None`` when ``check`` passed within ``timeout_s``, else what is wrong with ``name``."""
    try:
        await asyncio.wait_for(asyncio.to_thread(check), timeout_s)
    except TimeoutError:
        return f"{name} did not answer within {timeout_s:g} s"
    except Exception as exc:  # any failure to reach it is "not ready"; the message says which
        # The class name only: driver messages can carry host details; the log has the rest (never a password:
        # neither psycopg nor kombu puts one in its errors).
        logger.warning("readiness: %s unreachable: %s", name, exc)
        return f"{name} unreachable ({type(exc).__name__})"
    return None


async def unready_dependencies(*, engine: Engine, broker_url: str, timeout_s: float = READY_TIMEOUT_S) -> list[str]:
    """What is unreachable, checked concurrently (empty when ready); bounded by ``timeout_s``."""
    failures = await asyncio.gather(
        _failure("database", lambda: check_database(engine), timeout_s),
        _failure("broker", lambda: check_broker(broker_url, timeout_s), timeout_s),
    )
    return [failure for failure in failures if failure is not None]
