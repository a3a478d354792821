"""The deadline sweep: end tasks past their deadline whose next job never came — once per deployment.

Every gateway replica runs a :class:`DeadlineSweeper`, but only the one holding the
sweep lock sweeps. On PostgreSQL the lock is a session-level advisory lock
(``pg_try_advisory_lock``) on a connection the sweeper keeps open: the database
releases it when that connection ends (the replica stopped or died), and another
replica's next round takes it. On SQLite one process is the whole deployment, so
its sweeper always sweeps.

Usage::

    sweeper = DeadlineSweeper(engine, interval_s=15)
    task = asyncio.create_task(sweeper.run())      # in the gateway's lifespan
    ...
    task.cancel(); sweeper.close()
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from shared import crud
from shared.db import session_scope

__all__ = ["SWEEP_LOCK_KEY", "DeadlineSweeper"]

logger = logging.getLogger(__name__)

#: The advisory lock id of the sweep (any 64-bit number no other part of the product uses).
SWEEP_LOCK_KEY = 0x756D_6953_7765_6570  # "umiSweep"
#: A live handler notices its deadline within its LLM timeout; give it a moment first.
GRACE_S = 5.0


class DeadlineSweeper:
    """Sweeps every ``interval_s`` while it holds the deployment's sweep lock."""

    def __init__(self, engine: Engine, *, interval_s: float, grace_s: float = GRACE_S) -> None:
        self.engine = engine
        self.interval_s = interval_s
        self.grace_s = grace_s
        #: Rounds this replica swept (it held the lock), for tests and logs.
        self.rounds = 0
        self._lock_connection: Connection | None = None

    @property
    def leads(self) -> bool:
        """Whether this replica held the sweep lock at its last round."""
        return self.engine.dialect.name != "postgresql" or self._lock_connection is not None

    async def run(self) -> None:
        """Sweep forever, one round every ``interval_s``; a failed round is logged and retried next time."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                ended = await asyncio.to_thread(self.sweep_once)
            except Exception:  # the database may be briefly away; try again next round
                logger.exception("sweeping overdue tasks failed")
                continue
            if ended:
                logger.warning("ended %d task(s) past their deadline: %s", len(ended), ", ".join(map(str, ended)))

    def sweep_once(self) -> list[uuid.UUID]:
        """One round: take or keep the lock, and if held end the overdue tasks (their ids)."""
        if not self._hold_lock():
            return []
        self.rounds += 1
        with session_scope(self.engine) as session:
            return crud.fail_overdue_tasks(session=session, grace_s=self.grace_s)

    def close(self) -> None:
        """Give the lock up (closing its connection releases it), so another replica takes over at once."""
        connection, self._lock_connection = self._lock_connection, None
        if connection is not None:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SWEEP_LOCK_KEY})
            except SQLAlchemyError:
                pass  # the connection is gone (or its transaction is), and the lock with it
            finally:
                connection.invalidate()  # never back to the pool holding a session lock
                connection.close()

    def _hold_lock(self) -> bool:
        if self.engine.dialect.name != "postgresql":
            return True
        if self._lock_connection is not None:
            try:
                self._lock_connection.execute(text("SELECT 1"))
                return True  # a live session keeps its advisory lock
            except DBAPIError:
                logger.warning("the sweep lock's database connection was lost; trying to take the lock again")
                self.close()
        connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            held = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": SWEEP_LOCK_KEY}).scalar_one()
        except BaseException:
            connection.close()
            raise
        if not held:
            connection.close()
            return False
        logger.info("this gateway now runs the deadline sweep")
        self._lock_connection = connection
        return True
