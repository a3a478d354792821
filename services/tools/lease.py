"""Leases on tool-call claims: who runs a call now, and for how long without news.

A tools worker claims a call (``umi_tool_call``) under a unique owner id and a lease
of ``UMI_TOOLS_LEASE_S`` seconds, and :class:`LeaseKeeper` renews the lease every
third of that while the call runs and its observation is stored. The broker's
*redelivered* flag cannot tell a dead worker from a live one that only lost its
broker connection (the broker requeues that worker's unacked messages, yet its
threads still finish their calls), so another copy of the job takes a call over
only when the lease lapsed: the owner died or stalled for a whole lease.

Usage::

    keeper = LeaseKeeper(engine, lease_s=30)
    with keeper.hold(claim.call):
        ...run the call and store its step...
    keeper.close()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from shared import crud
from shared.db import session_scope
from shared.models import ToolCall

__all__ = ["LeaseKeeper", "new_owner_id", "owner_pid"]

logger = logging.getLogger(__name__)

#: Renewals per lease: a lease survives two missed renewals.
RENEWALS_PER_LEASE = 3


def new_owner_id() -> str:
    """A unique owner id for one claiming attempt; it names the process for people reading the table."""
    return f"{uuid.uuid4().hex}:{os.getpid()}@{socket.gethostname()}"[:128]


def owner_pid(owner: str) -> int:
    """The process id recorded in an owner id made by :func:`new_owner_id`."""
    return int(owner.split(":", 1)[1].split("@", 1)[0])


class LeaseKeeper:
    """Keeps the leases of this process's running tool calls alive, from one thread.

    Every ``lease_s / 3`` seconds it extends, in one statement, the lease of each
    claim held in :meth:`hold`. A failed renewal (database unreachable) is logged and
    tried again at the next tick; a claim another owner took over is logged and
    dropped.
    """

    def __init__(self, engine: Engine, *, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.lease_s = lease_s
        self._engine = engine
        self._held: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval_s(self) -> float:
        """Seconds between renewals."""
        return self.lease_s / RENEWALS_PER_LEASE

    @contextmanager
    def hold(self, call: ToolCall) -> Iterator[None]:
        """Renew ``call``'s lease for its owner until the block ends."""
        assert call.id is not None and call.owner is not None, "only a stored claim with an owner has a lease"
        with self._lock:
            self._held[call.id] = call.owner
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tool-call-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                if self._held.get(call.id) == call.owner:
                    del self._held[call.id]

    def renew(self) -> None:
        """Extend every held lease now (the thread calls this each interval)."""
        with self._lock:
            held = dict(self._held)
        if not held:
            return
        try:
            with session_scope(self._engine) as session:
                renewed = crud.renew_tool_call_leases(session=session, held=held, lease_s=self.lease_s)
        except SQLAlchemyError as exc:
            logger.warning("could not renew %d tool-call lease(s), trying again in %.1fs: %s", len(held), self.interval_s, exc)
            return
        for claim_id in held.keys() - renewed:
            logger.warning("tool call %d: its lease lapsed and another worker took it over", claim_id)
            with self._lock:
                if self._held.get(claim_id) == held[claim_id]:
                    del self._held[claim_id]

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure
                logger.exception("tool-call lease renewal failed")

    def close(self) -> None:
        """Stop renewing (the leases then lapse unless their calls finished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
