"""Per-tenant limits: request rate and tasks in flight, the same for every gateway replica.

The rate is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp,
the *theoretical arrival time*) stored per tenant in ``umi_tenant_rate`` and updated under
its row lock, so all replicas share one bucket. ``limits``/``slowapi`` keep their
counters in process memory or Redis; this product's shared state is PostgreSQL, so the
bucket lives there. Tasks in flight are counted from ``umi_task`` itself.

:func:`admit_task` is how a front door (HTTP, AMQP) takes a tenant's task: an idempotent
replay first (never refused by the in-flight limit: it creates nothing), then the
in-flight limit, then :func:`shared.tasks.submit_task`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from shared import crud
from shared.db import session_scope
from shared.dispatch import Dispatcher
from shared.lifecycle import ACTIVE_STATUSES
from shared.models import Task, Tenant, TenantRate
from shared.schemas import TaskCreate, TaskOrigin
from shared.settings import Settings
from shared.tasks import submit_task

__all__ = ["Admitted", "OverLimit", "Refusal", "admit_task", "check_in_flight", "take_request"]


@dataclass(frozen=True)
class Refusal:
    """Why a tenant must wait, and for how long (``Retry-After``)."""

    reason: str
    retry_after_s: float


def take_request(*, session: Session, tenant: Tenant, settings: Settings, now: float | None = None) -> Refusal | None:
    """Count one request of ``tenant`` against its rate; a :class:`Refusal` when over it (nothing counted).

    The caller commits: the row lock on the tenant's bucket is held until then.
    """
    rate = tenant.rate_per_s or settings.tenant_rate_per_s
    burst = tenant.burst or settings.tenant_burst
    interval = 1.0 / rate
    now = time.time() if now is None else now
    state = session.exec(select(TenantRate).where(TenantRate.tenant_id == tenant.id).with_for_update()).first()
    if state is None:
        state = TenantRate(tenant_id=tenant.id, tat=now)
        session.add(state)
    tat = max(state.tat, now)
    allowed_at = tat + interval - burst * interval
    if allowed_at > now:
        return Refusal(reason=f"request rate over {rate:g}/s (burst {burst})", retry_after_s=allowed_at - now)
    state.tat = tat + interval
    session.flush()
    return None


def check_in_flight(*, session: Session, tenant: Tenant, settings: Settings) -> Refusal | None:
    """A :class:`Refusal` when ``tenant`` already has its maximum of tasks not yet ended."""
    limit = tenant.max_in_flight or settings.tenant_max_in_flight
    in_flight = session.exec(
        select(func.count()).select_from(Task).where(Task.tenant_id == tenant.id, col(Task.status).in_(ACTIVE_STATUSES))
    ).one()
    if in_flight >= limit:
        # Tasks end within their deadline; a second is a fair first wait.
        return Refusal(reason=f"{in_flight} tasks in flight (limit {limit})", retry_after_s=1.0)
    return None


class OverLimit(Exception):
    """The tenant is over a limit; ``refusal`` says which and when to retry."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(frozen=True)
class Admitted:
    """The tenant's task, and whether it was stored by an earlier request with the same idempotency key."""

    task: Task
    replayed: bool


def admit_task(
    *, engine: Engine, dispatcher: Dispatcher, settings: Settings, task_in: TaskCreate, tenant: Tenant, origin: TaskOrigin
) -> Admitted:
    """Take ``task_in`` for ``tenant`` (``origin.tenant_id`` must be its id), or replay the task stored under its key.

    Raises :class:`OverLimit` when the tenant has its maximum of tasks in flight, and whatever
    :func:`~shared.tasks.submit_task` raises (``IdempotencyKeyReused`` for a key used with
    another request). The in-flight count is exact per request, but it is not taken under a
    lock: two submissions racing at the limit can both pass it (one task over the limit each).
    ``replayed`` is exact for a retry after the first request stored its task; of two copies
    that race, the one that loses the insert is answered with the winner's task and
    ``replayed=False`` (``submit_task`` does not say which path it took).
    """
    if origin.idempotency_key is not None:
        with session_scope(engine) as session:
            stored = crud.get_task_by_idempotency_key(session=session, tenant_id=tenant.id, key=origin.idempotency_key)
        if stored is not None:
            # submit_task compares the request with the stored one and returns the stored task (nothing published).
            task = submit_task(engine=engine, dispatcher=dispatcher, settings=settings, task_in=task_in, origin=origin)
            return Admitted(task=task, replayed=True)
    with session_scope(engine) as session:
        refusal = check_in_flight(session=session, tenant=tenant, settings=settings)
    if refusal is not None:
        raise OverLimit(refusal)
    task = submit_task(engine=engine, dispatcher=dispatcher, settings=settings, task_in=task_in, origin=origin)
    return Admitted(task=task, replayed=False)
